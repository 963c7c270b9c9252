"""Hard fixed-offset attention (fast vision-only training) matches sharp soft attention."""
from __future__ import annotations

import pytest
import torch

from mmeff.zoo.fixed_offset_attention import FixedOffsetMode, clip_source, fixed_offset_attention, qwen_source
from mmeff.zoo.local_attention_init import head_offsets, init_clip_tower, init_qwen_tower

from .test_local_attention_init import GRID, _clip_tower, _qwen_visual, _scene_pixels


def test_function_gathers_each_heads_offset_neighbour():
    src = clip_source(GRID, 4, 0)
    value = torch.randn(2, 4, 1 + GRID * GRID, 8)
    mod = torch.nn.Module()
    mod._mmeff_offset_source = src
    out, weights = fixed_offset_attention(mod, value, value, value, None)
    assert weights is None and out.shape == (2, 1 + GRID * GRID, 4, 8)
    for h, (dx, dy) in enumerate(head_offsets(4, 0)):
        r, c = 3, 5
        i, j = 1 + r * GRID + c, 1 + (r + dy) * GRID + (c + dx)
        assert torch.equal(out[:, i, h], value[:, h, j])
    assert torch.equal(out[:, 0], value[:, :, 0])  # CLS keeps itself


def test_qwen_source_follows_window_order():
    src = qwen_source(4, 2, 4, 0)  # order: (0,0) (0,1) (1,0) (1,1) (0,2) ...
    assert src[0, 0] == 1  # (0,0) + (dx=1) -> (0,1), index 1
    assert src[2, 0] == 2  # (0,0) + (dy=1) -> (1,0), index 2
    assert src[1, 0] == 0  # left of the border clamps to itself


class _Host(torch.nn.Module):
    """Minimal stand-in exposing ``.model.vision_tower`` / ``.model.visual`` like the zoo VLMs."""

    def __init__(self, **parts):
        super().__init__()
        self.model = torch.nn.Module()
        for k, v in parts.items():
            setattr(self.model, k, v)


def test_clip_fixed_mode_equals_sharp_soft_attention_and_switches_back():
    tower = _clip_tower(4)
    init_clip_tower(tower, GRID, alpha=20.0)
    tower.config._attn_implementation = "sdpa"
    x = _scene_pixels(2)
    mode = FixedOffsetMode(_Host(vision_tower=tower), GRID)
    with torch.no_grad():
        soft = tower(pixel_values=x).last_hidden_state[:, 1:]
        mode.on()
        hard = tower(pixel_values=x).last_hidden_state[:, 1:]
        mode.off()
        again = tower(pixel_values=x).last_hidden_state[:, 1:]
    assert torch.equal(again, soft)
    assert not torch.allclose(hard, soft, atol=1e-6)  # the modes really differ ...
    assert (hard - soft).abs().mean() < 0.05 * soft.abs().mean()  # ... but only by the softness


@pytest.mark.parametrize("gap, close", [(40.0, True), (2.0, False)])
def test_qwen_fixed_mode_equals_sharp_soft_attention(gap, close):
    visual = _qwen_visual(105.0)
    init_qwen_tower(visual, score_gap=gap)
    torch.manual_seed(1)
    pixels = torch.randn(2 * GRID * GRID, 3 * 2 * 14 * 14)  # two images packed in one row
    grid_thw = torch.tensor([[1, GRID, GRID], [1, GRID, GRID]])
    mode = FixedOffsetMode(_Host(visual=visual), GRID)
    with torch.no_grad():
        soft = visual(pixels, grid_thw=grid_thw).pooler_output
        mode.on()
        hard = visual(pixels, grid_thw=grid_thw).pooler_output
        mode.off()
        again = visual(pixels, grid_thw=grid_thw).pooler_output
    assert torch.equal(again, soft)
    # sharp soft attention is the hard gather; a soft one (gap 2) is not, so the switch really happened
    assert ((hard - soft).abs().max() < 1e-3 * soft.abs().max()) == close
