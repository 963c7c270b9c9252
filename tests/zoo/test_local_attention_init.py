"""The convolution-like start of the zoo vision towers: every head attends to its own offset."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmeff.zoo.fixed_offset_attention import qwen_window_order
from mmeff.zoo.local_attention_init import (
    head_offsets,
    init_clip_tower,
    init_qwen_tower,
    qwen_vision_rope_theta,
)

GRID = 8


def _clip_tower(heads: int = 4, layers: int = 3):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=16 * heads, intermediate_size=32 * heads, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=14 * GRID, patch_size=14,
                           attn_implementation="eager")
    torch.manual_seed(0)
    return CLIPVisionModel(cfg).eval()


def _scene_pixels(n: int) -> torch.Tensor:
    """Shapes-world scenes at the tiny tower's size, CLIP-normalised."""
    from mmeff.zoo.world import generate_scene, render

    mean = torch.tensor([0.4815, 0.4578, 0.4082]).view(3, 1, 1)
    std = torch.tensor([0.2686, 0.2613, 0.2758]).view(3, 1, 1)
    imgs = []
    for seed in range(n):
        arr = torch.from_numpy(np.asarray(render(generate_scene(seed), 14 * GRID), dtype=np.float32))
        imgs.append((arr.permute(2, 0, 1) / 255 - mean) / std)
    return torch.stack(imgs)


def _peaks(attn: torch.Tensor, grid: int, row: int, col: int) -> list[tuple[int, int, float]]:
    """Per head: (dx, dy, weight) of the most attended patch from the query at (row, col)."""
    out = []
    for a in attn:
        w = a[row * grid + col]
        j = int(w.argmax())
        out.append((j % grid - col, j // grid - row, float(w[j])))
    return out


def test_head_offsets_cover_the_neighbourhood():
    assert set(head_offsets(8, 0)) == {(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)} - {(0, 0)}
    assert set(head_offsets(4, 0)) | set(head_offsets(4, 1)) == set(head_offsets(8, 0))


@pytest.mark.parametrize("heads", [4, 8])
def test_clip_heads_attend_to_their_offset(heads):
    tower = _clip_tower(heads)
    before = _clip_tower(heads)
    init_clip_tower(tower, GRID)
    pixels = _scene_pixels(2)
    with torch.no_grad():
        attns = tower(pixel_values=pixels, output_attentions=True).attentions
        attns_before = before(pixel_values=pixels, output_attentions=True).attentions
    for layer, (a, a0) in enumerate(zip(attns, attns_before)):
        for b in range(2):
            patches = a[b, :, 1:, 1:]  # drop CLS
            for (dx, dy, w), want in zip(_peaks(patches, GRID, 4, 4), head_offsets(heads, layer)):
                assert (dx, dy) == want, f"layer {layer}: head peaks at {(dx, dy)}, expected {want}"
                assert w > 0.3  # uniform would be 1/64
        # the stock start is near-uniform: the check above can fail
        assert a0[:, :, 1:, 1:].amax() < 0.2


def test_clip_init_rejects_a_wrong_grid():
    with pytest.raises(ValueError, match="position table"):
        init_clip_tower(_clip_tower(), GRID + 1)


def _qwen_visual(theta: float | None):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=2, embed_dim=96, hidden_size=64, num_heads=4, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, mlp_ratio=2, in_channels=3)
    if theta is not None:
        vision["rope_parameters"] = {"rope_type": "axial", "rope_theta": theta}
    cfg = Qwen2VLConfig(vision_config=vision, text_config=dict(vocab_size=64, hidden_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}))
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(cfg).model.visual.eval()


def _qwen_attention(visual, pixels, grid_thw) -> list[torch.Tensor]:
    """Per block: softmax(q k^T / sqrt(d)) [heads, N, N] from the block's own q/k and rotary tables."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    seen: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = []
    handles = []
    for blk in visual.blocks:
        def hook(mod, args, kwargs, out, blk=blk):
            h = kwargs.get("hidden_states", args[0] if args else None)
            seen.append((blk.attn.qkv(h), kwargs["position_embeddings"]))
        handles.append(blk.attn.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        visual(pixels, grid_thw=grid_thw)
    for h in handles:
        h.remove()
    heads = visual.blocks[0].attn.num_heads
    out = []
    for qkv, (cos, sin) in seen:
        n = qkv.shape[0]
        q, k, _ = qkv.reshape(n, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        scores = torch.einsum("qhd,khd->hqk", q, k) * q.shape[-1] ** -0.5
        out.append(scores.softmax(-1))
    return out


def test_qwen_heads_attend_to_their_offset():
    visual = _qwen_visual(qwen_vision_rope_theta(96 // 4))
    init_qwen_tower(visual)
    pixels = torch.randn(GRID * GRID, 3 * 2 * 14 * 14)
    grid_thw = torch.tensor([[1, GRID, GRID]])
    order = qwen_window_order(GRID, 2)
    index = {rc: i for i, rc in enumerate(order)}
    query = index[(4, 4)]
    for layer, attn in enumerate(_qwen_attention(visual, pixels, grid_thw)):
        for h, (dx, dy) in enumerate(head_offsets(4, layer)):
            w = attn[h, query]
            assert int(w.argmax()) == index[(4 + dy, 4 + dx)], f"layer {layer} head {h}"
            assert float(w.max()) > 0.5


def test_qwen_init_needs_usable_rotary_frequencies():
    # a base of 1e6 with 24-dim heads leaves one frequency >= 0.2 rad/patch per axis (1, 0.1, ...)
    with pytest.raises(ValueError, match="rope_theta"):
        init_qwen_tower(_qwen_visual(1e6))


def test_freeze_keeps_the_offset_pattern_and_trains_the_rest():
    from mmeff.zoo.local_attention_init import freeze_local_attention, position_rows

    from .test_fixed_offset_attention import _Host

    tower = _clip_tower(4)
    init_clip_tower(tower, GRID)
    host = _Host(vision_tower=tower)
    handles = freeze_local_attention(host)
    tower(pixel_values=_scene_pixels(2)).last_hidden_state.pow(2).mean().backward()
    for name, (param, rows) in position_rows(host).items():
        assert param.grad is not None and not param.grad[rows].any(), name
    assert tower.encoder.layers[0].self_attn.v_proj.weight.grad.abs().sum() > 0
    assert tower.encoder.layers[0].self_attn.out_proj.weight.grad[:8].abs().sum() > 0  # content rows train
    for h in handles:
        h.remove()


def _interior_agreement(tower, pixels: torch.Tensor) -> float:
    """Share of (patch, head) rows with a neighbour at the head's offset whose softmax peaks there."""
    from mmeff.zoo.fixed_offset_attention import clip_source

    with torch.no_grad():
        att = tower(pixel_values=pixels, output_attentions=True).attentions
    hits = total = 0
    for li, a in enumerate(att):
        src = clip_source(GRID, a.shape[1], li)
        for h, (dx, dy) in enumerate(head_offsets(a.shape[1], li)):
            for i in range(GRID * GRID):
                r, c = divmod(i, GRID)
                if 0 <= r + dy < GRID and 0 <= c + dx < GRID:
                    hits += int((a[:, h, i + 1].argmax(-1) == src[h, i + 1]).sum())
                    total += a.shape[0]
    return hits / total


def test_position_dominant_layernorms_keep_the_offsets_when_content_grows():
    """Content ten times louder (as after training) pulls the plain start's softmax off its offsets,
    because each key's score scales with its own LayerNorm 1/sigma; with position-dominant
    LayerNorms sigma is set by the never-written position channels and every peak stays put."""
    pixels = _scene_pixels(3)
    results = {}
    for dominant in (None, 20.0):
        tower = _clip_tower(4)
        init_clip_tower(tower, GRID, dominant=dominant)
        start = _interior_agreement(tower, pixels)
        with torch.no_grad():
            tower.embeddings.patch_embedding.weight.mul_(10.0)
            for layer in tower.encoder.layers:
                layer.mlp.fc2.weight[:, :].mul_(10.0)  # content written into the residual stream grows too
        results[dominant] = (start, _interior_agreement(tower, pixels))
    assert results[None][0] == 1.0 and results[20.0][0] == 1.0
    assert results[20.0][1] >= 0.97, results  # measured 0.984; plain start 0.745
    assert results[None][1] < results[20.0][1] - 0.1, results


def test_train_vlm_builds_the_dominant_start_and_freezes_its_rows() -> None:
    """``train_vlm --dominant`` reaches the CLIP tower; Qwen2-VL refuses it; the frozen rows include
    the first LayerNorm's position bias."""
    from mmeff.zoo.load import ZOO_MODELS
    from mmeff.zoo.train_vlm import build_model, build_processor
    from mmeff.zoo.local_attention_init import position_rows

    proc = build_processor(ZOO_MODELS["tiny-llava"])
    plain = build_model("tiny-llava", proc, seed=0)
    dom = build_model("tiny-llava", proc, seed=0, dominant=20.0)
    table_plain = plain.model.vision_tower.embeddings.position_embedding.weight
    table_dom = dom.model.vision_tower.embeddings.position_embedding.weight
    assert torch.allclose(table_dom, 20.0 * table_plain)
    assert "pre_layrnorm.bias" in position_rows(dom)
    with pytest.raises(ValueError, match="CLIP tower"):
        build_model("tiny-qwen2-vl", build_processor(ZOO_MODELS["tiny-qwen2-vl"]), dominant=20.0)
