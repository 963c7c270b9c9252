"""Hard fixed-offset attention for the zoo vision towers' vision-only training phase.

After :mod:`mmeff.zoo.local_attention_init`, each head of a tower attends (softly) to one
neighbour offset. This attention function, registered with ``transformers``' attention
dispatcher and selected for the vision tower only, makes that exact: head ``h`` of token ``i``
returns the value of token ``i + offset_h`` (clamped at the grid border; CLS attends to itself).
It costs a gather instead of a 577 x 577 softmax, so vision-only steps on the CPU run several
times faster while training the same weights the soft attention uses afterwards. Query and key
projections get no gradient in this mode and keep their initial (offset-selecting) values.
The tower is switched back to its original implementation before joint training and saving.
"""
from __future__ import annotations

from typing import Any

import torch

from .local_attention_init import head_offsets

NAME = "mmeff_fixed_offsets"
_SOURCE = "_mmeff_offset_source"  # per-instance attribute: [heads, tokens per image] source indices


def _grid_source(grid: int, offsets: list[tuple[int, int]], order: list[tuple[int, int]]) -> torch.Tensor:
    """[heads, len(order)]: index (in ``order``) of each token's neighbour at each head's offset."""
    where = {rc: i for i, rc in enumerate(order)}
    rows = []
    for dx, dy in offsets:
        rows.append([where[(min(max(r + dy, 0), grid - 1), min(max(c + dx, 0), grid - 1))] for r, c in order])
    return torch.tensor(rows)


def clip_source(grid: int, n_heads: int, layer: int) -> torch.Tensor:
    """Sources for a CLIP tower: CLS first (attends to itself), then row-major patches."""
    order = [(r, c) for r in range(grid) for c in range(grid)]
    patches = _grid_source(grid, head_offsets(n_heads, layer), order) + 1
    return torch.cat([torch.zeros(n_heads, 1, dtype=torch.long), patches], dim=1)


def qwen_window_order(grid: int, merge: int) -> list[tuple[int, int]]:
    """(row, col) of each Qwen2-VL vision token: ``merge`` x ``merge`` windows, row-major."""
    return [(bh * merge + i, bw * merge + j) for bh in range(grid // merge) for bw in range(grid // merge)
            for i in range(merge) for j in range(merge)]


def qwen_source(grid: int, merge: int, n_heads: int, layer: int) -> torch.Tensor:
    """Sources for a Qwen2-VL tower, whose tokens come in window order."""
    return _grid_source(grid, head_offsets(n_heads, layer), qwen_window_order(grid, merge))


def fixed_offset_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention-interface function: ``value`` [B, H, N, D] gathered at each head's offset.
    Packed sequences (Qwen2-VL: all images of a batch in one row) repeat the per-image map."""
    src = getattr(module, _SOURCE)
    b, h, n, d = value.shape
    per = src.shape[1]
    if n % per:
        raise ValueError(f"fixed-offset attention expects a multiple of {per} tokens per row, got {n}")
    reps = n // per
    idx = (src.unsqueeze(1) + per * torch.arange(reps).view(1, reps, 1)).reshape(h, n).to(value.device)
    out = torch.gather(value, 2, idx.view(1, h, n, 1).expand(b, h, n, d))
    return out.transpose(1, 2).contiguous(), None


class FixedOffsetMode:
    """Switch a zoo model's vision tower to fixed-offset attention and back (per instance)."""

    def __init__(self, model: Any, grid: int):
        """``grid``: patches per side of the tower's (square) input images."""
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, fixed_offset_attention)
        inner = model.model
        if hasattr(inner, "visual"):
            visual = inner.visual
            self.config = visual.config
            n_heads = visual.blocks[0].attn.num_heads
            for li, blk in enumerate(visual.blocks):
                setattr(blk.attn, _SOURCE, qwen_source(grid, self.config.spatial_merge_size, n_heads, li))
        else:
            tower = inner.vision_tower
            self.config = tower.config
            for li, layer in enumerate(tower.encoder.layers):
                setattr(layer.self_attn, _SOURCE, clip_source(grid, self.config.num_attention_heads, li))
        self.original = self.config._attn_implementation
        self.active = False

    def on(self) -> None:
        self.config._attn_implementation = NAME
        self.active = True

    def off(self) -> None:
        self.config._attn_implementation = self.original
        self.active = False
