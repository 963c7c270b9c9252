"""Convolution-like start for the zoo VLMs' from-scratch vision towers (training only).

Measured on the CPU (see docs/STATUS.md): a 64-wide, 3-layer CLIP tower trained from scratch on
per-patch shape labels stays near 0.3 per-object shape accuracy after 200 steps, while a network
that only replaces its attention by 3x3 convolutions over the same linear patch embedding reaches
1.0 in 600 steps. A freshly initialised ViT attends almost uniformly over all 577 tokens
(CLIP's position table starts at std 0.02), so nothing combines an edge patch with its neighbours,
which is what telling a star from a circle needs. Multi-head attention can express a
convolution when each head attends to one fixed offset (Cordonnier et al., ICLR 2020); this
module *initialises* every head that way and leaves it free to learn afterwards. The models stay
stock ``transformers`` classes; only their starting weights differ.

* CLIP (LLaVA's tower, absolute positions): the last ``4 * n_freq`` channels of the position
  table hold 2-D sine-cosine features and nothing else writes into them at the start (patch
  embedding, attention output and MLP output rows zeroed there). Head ``h``'s key reads those
  channels as they are and its query reads them rotated by the head's offset, so
  ``q_i . k_j`` peaks where ``pos_j = pos_i + offset``.
* Qwen2-VL (2-D rotary positions): query and key weights start at zero and their biases are
  constant per-head vectors whose rotary phase difference equals the offset, which makes the
  score a pure function of ``pos_j - pos_i`` with its peak at the offset.
"""
from __future__ import annotations

import math
from typing import Any

import torch

NEIGHBOURS: tuple[tuple[int, int], ...] = ((1, 0), (-1, 0), (0, 1), (0, -1))
DIAGONALS: tuple[tuple[int, int], ...] = ((1, 1), (-1, -1), (1, -1), (-1, 1))
CLIP_FREQS: tuple[float, ...] = (2.0, 1.5, 1.0, 0.6)
"""Radians per patch of the sine-cosine position channels (high enough to separate neighbours,
incommensurate enough that no far offset scores like the target)."""

SCORE_GAP = 12.0
"""Logit margin of the target offset over its nearest rival (attention ~0.99 on the target)."""


def head_offsets(n_heads: int, layer: int) -> list[tuple[int, int]]:
    """(dx, dy) offset of each head of ``layer``: with 8+ heads the full 3x3 neighbourhood every
    layer; with fewer, the 4-neighbourhood and the diagonals in alternate layers."""
    if n_heads >= 8:
        ring = NEIGHBOURS + DIAGONALS
        return [ring[h % 8] for h in range(n_heads)]
    return list((NEIGHBOURS if layer % 2 == 0 else DIAGONALS)[:n_heads]) + [(0, 0)] * max(0, n_heads - 4)


def _clip_position_layout(width: int, n_heads: int) -> tuple[int, int]:
    """(first position channel, frequencies per axis) of a CLIP tower's fixed-offset start."""
    n_freq = min(len(CLIP_FREQS), width // n_heads // 4)
    return width - 4 * n_freq, n_freq


def _rotation(freq: float, shift: int) -> torch.Tensor:
    """2x2 map taking (sin f x, cos f x) to (sin f(x+shift), cos f(x+shift))."""
    c, s = math.cos(freq * shift), math.sin(freq * shift)
    return torch.tensor([[c, s], [-s, c]])


@torch.no_grad()
def init_clip_tower(tower: Any, grid: int, alpha: float = 3.0, position_gain: float = 8.0,
                    dominant: float | None = None) -> None:
    """Convolution-like start for a ``CLIPVisionModel`` / ``CLIPVisionTransformer`` on a
    ``grid`` x ``grid`` patch grid (see the module docstring).

    ``dominant`` (e.g. 20): *position-dominant LayerNorms*. The raw position table is that many
    times louder, and the position channels leave the first LayerNorm ``position_gain`` times
    louder again. So in every LayerNorm the spread sigma is set by the position channels, which are
    never written, and it hardly depends on a token's content. Without this, a key's score scales
    with its own 1/sigma, and the softmax attention drifts away from the fixed offsets as content
    grows. The content gains of every LayerNorm start at the expected sigma, so content passes
    through at its raw scale."""
    cfg = tower.config
    width, n_heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim = width // n_heads
    p0, n_freq = _clip_position_layout(width, n_heads)
    if n_freq < 2:
        raise ValueError(f"local attention init needs head_dim >= 8, got {head_dim}")
    freqs = CLIP_FREQS[:n_freq]
    emb = tower.embeddings
    if emb.position_embedding.weight.shape[0] != grid * grid + 1:
        raise ValueError(f"position table has {emb.position_embedding.weight.shape[0]} rows, expected {grid * grid + 1}")
    g = torch.arange(grid, dtype=torch.float32)
    ys, xs = (t.reshape(-1) for t in torch.meshgrid(g, g, indexing="ij"))
    table = emb.position_embedding.weight
    table.zero_()
    for k, f in enumerate(freqs):
        for axis, coord in ((0, xs), (1, ys)):
            ch = p0 + axis * 2 * n_freq + 2 * k
            table[1:, ch] = torch.sin(f * coord) * (dominant or 1.0)
            table[1:, ch + 1] = torch.cos(f * coord) * (dominant or 1.0)
    emb.patch_embedding.weight[p0:] = 0
    # LayerNorm divides each token by its own spread: if content dominated it, a key's score would
    # scale with how busy its patch is, and a plain neighbour could outscore the target offset. So the
    # position channels leave the first LayerNorm ``position_gain`` times louder than content.
    tower.pre_layrnorm.weight[p0:] = position_gain
    if dominant:
        # sigma of a pre_layrnorm input ~ |position| / sqrt(width); of a residual-stream vector likewise
        n_pos = width - p0
        tower.pre_layrnorm.weight[:p0] = dominant * math.sqrt(n_pos / 2) / math.sqrt(width)
        # the position part leaves pre_layrnorm with norm position_gain * sqrt(width), so every later
        # LayerNorm's sigma is ~position_gain: content gains at that value pass content at its raw scale
        for layer in tower.encoder.layers:
            for ln in (layer.layer_norm1, layer.layer_norm2):
                ln.weight[:p0] = position_gain
    for li, layer in enumerate(tower.encoder.layers):
        attn = layer.self_attn
        for lin in (attn.out_proj, layer.mlp.fc2):  # keep the position channels clean at the start
            lin.weight[p0:] = 0
            if lin.bias is not None:
                lin.bias[p0:] = 0
        for lin in (attn.q_proj, attn.k_proj):
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()
        for h, (dx, dy) in enumerate(head_offsets(n_heads, li)):
            for axis, shift in ((0, dx), (1, dy)):
                for k, f in enumerate(freqs):
                    src = p0 + axis * 2 * n_freq + 2 * k
                    row = h * head_dim + axis * 2 * n_freq + 2 * k
                    attn.k_proj.weight[row : row + 2, src : src + 2] = torch.eye(2)
                    attn.q_proj.weight[row : row + 2, src : src + 2] = alpha * _rotation(f, shift)


@torch.no_grad()
def init_qwen_tower(visual: Any, min_freq: float = 0.2, score_gap: float = SCORE_GAP) -> None:
    """Convolution-like start for a Qwen2-VL vision tower (see the module docstring). Rotary
    frequencies below ``min_freq`` radians per patch barely separate neighbours and get no weight;
    ``score_gap`` is the logit margin of the target over a one-patch miss."""
    blocks = visual.blocks
    n_heads = blocks[0].attn.num_heads
    dim = blocks[0].attn.qkv.in_features
    head_dim = dim // n_heads
    quarter = head_dim // 4  # frequencies per axis
    inv_freq = visual.rotary_pos_emb.inv_freq.float()[:quarter]
    weights = (inv_freq >= min_freq).float()
    if weights.sum() < 2:
        raise ValueError(
            f"only {int(weights.sum())} rotary frequencies >= {min_freq} per axis; lower the vision rope_theta"
        )
    gap = float((weights * (1 - torch.cos(inv_freq))).sum())  # score drop one patch off target
    alpha = math.sqrt(score_gap / (gap * head_dim**-0.5))
    for li, blk in enumerate(blocks):
        qkv = blk.attn.qkv
        qkv.weight[: 2 * dim] = 0
        qkv.bias[: 2 * dim] = 0
        for h, (dx, dy) in enumerate(head_offsets(n_heads, li)):
            base = h * head_dim
            for axis, shift in ((0, dy), (1, dx)):  # angle layout per head: [h freqs, w freqs] twice
                for k in range(quarter):
                    if weights[k] == 0:
                        continue
                    i = base + axis * quarter + k
                    phase = float(inv_freq[k]) * shift
                    qkv.bias[i] = alpha * math.cos(phase)
                    qkv.bias[i + head_dim // 2] = alpha * math.sin(phase)
                    qkv.bias[dim + i] = alpha
                    qkv.bias[dim + i + head_dim // 2] = 0.0


def qwen_vision_rope_theta(head_dim: int, second_freq: float = 0.46) -> float:
    """Vision rotary base whose second frequency is ``second_freq`` rad/patch (the stock 1e4 leaves
    one useful frequency per axis at tiny head sizes)."""
    return second_freq ** (-(head_dim // 2) / 2)


def init_local_attention(model: Any, dominant: float | None = None) -> None:
    """Apply the convolution-like start to a zoo LLaVA or Qwen2-VL model's vision tower
    (``dominant``: CLIP's position-dominant LayerNorms, see :func:`init_clip_tower`)."""
    inner = model.model
    if hasattr(inner, "visual"):
        if dominant:
            raise ValueError("dominant applies to the CLIP tower (tiny-llava); Qwen2-VL's rotary tower has no "
                             "position channels to make dominant")
        init_qwen_tower(inner.visual)
    else:
        cfg = inner.vision_tower.config
        init_clip_tower(inner.vision_tower, cfg.image_size // cfg.patch_size, dominant=dominant)


def position_rows(model: Any) -> dict[str, tuple[torch.nn.Parameter, slice]]:
    """The parameters (and rows) that hold the fixed-offset attention of a zoo model's tower:
    query/key projections, and for CLIP the rows writing into the position channels."""
    inner = model.model
    rows: dict[str, tuple[torch.nn.Parameter, slice]] = {}
    if hasattr(inner, "visual"):
        for i, blk in enumerate(inner.visual.blocks):
            dim = blk.attn.qkv.in_features
            rows[f"blocks.{i}.qkv.weight"] = (blk.attn.qkv.weight, slice(0, 2 * dim))
            rows[f"blocks.{i}.qkv.bias"] = (blk.attn.qkv.bias, slice(0, 2 * dim))
        return rows
    tower = inner.vision_tower
    width, n_heads = tower.config.hidden_size, tower.config.num_attention_heads
    p0, _ = _clip_position_layout(width, n_heads)
    every = slice(None)
    rows["patch_embedding"] = (tower.embeddings.patch_embedding.weight, slice(p0, None))
    rows["position_embedding"] = (tower.embeddings.position_embedding.weight, every)
    rows["pre_layrnorm.weight"] = (tower.pre_layrnorm.weight, slice(p0, None))
    rows["pre_layrnorm.bias"] = (tower.pre_layrnorm.bias, slice(p0, None))
    for i, layer in enumerate(tower.encoder.layers):
        # the attention LayerNorm's position rows shape the pattern as much as q/k do
        rows[f"{i}.layer_norm1.weight"] = (layer.layer_norm1.weight, slice(p0, None))
        rows[f"{i}.layer_norm1.bias"] = (layer.layer_norm1.bias, slice(p0, None))
        a = layer.self_attn
        for nm, lin in (("q_proj", a.q_proj), ("k_proj", a.k_proj)):
            rows[f"{i}.{nm}.weight"] = (lin.weight, every)
            rows[f"{i}.{nm}.bias"] = (lin.bias, every)
        for nm, lin in (("out_proj", a.out_proj), ("fc2", layer.mlp.fc2)):
            rows[f"{i}.{nm}.weight"] = (lin.weight, slice(p0, None))
            rows[f"{i}.{nm}.bias"] = (lin.bias, slice(p0, None))
    return rows


def freeze_local_attention(model: Any) -> list[Any]:
    """Keep the tower's attention pattern fixed while the rest trains: gradient hooks zero the
    gradient of :func:`position_rows`. Returns the hook handles (``.remove()`` to unfreeze).
    Training-only; the saved model is a stock class whose attention simply is that pattern."""
    handles = []
    for param, rows in position_rows(model).values():
        def mask(grad: torch.Tensor, rows: slice = rows) -> torch.Tensor:
            grad = grad.clone()
            grad[rows] = 0
            return grad
        handles.append(param.register_hook(mask))
    return handles
