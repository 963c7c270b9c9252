"""What the video methods record for sparsity maps: per (step, layer), per head, and the block masks."""
from __future__ import annotations

import pytest
import torch

import mmeff
from mmeff.video import VMoBA, RectifiedSpaAttn
from mmeff.video.sparsity_log import SparsityLog

from .test_video_methods import model_of, run


def test_sparsity_log_means_per_cell():
    log = SparsityLog()
    log.add(0, 1, 0.5)
    log.add(0, 1, 0.7)
    log.add(2, 0, 0.25)
    assert log.per_step_layer() == {0: {1: pytest.approx(0.6)}, 2: {0: 0.25}}


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_rectified_records_match_its_block_masks(family):
    model = model_of(family)
    cfg = RectifiedSpaAttn(drop=0.75, tau=0.2, block=16, preset="none", dense_layers=(0,), record_masks=True)
    with mmeff.apply(model, cfg) as h:
        run(model, family)
    rep = h.report()["per_method"]["rectified_spaattn"]
    masks = rep["block_masks"]
    assert sorted(masks) == sorted(rep["sparsity_per_layer"]) and 0 not in masks  # layer 0 ran dense
    heads = model.config.num_attention_heads
    for layer, m in masks.items():
        assert m.dtype == torch.bool and m.shape == (heads, 16, 16)  # 256 video tokens / block 16
        # one call per layer here, so the per-head numbers are exactly the masks' skipped fractions
        assert rep["sparsity_per_layer_head"][layer] == pytest.approx((1 - m.float().mean(dim=(1, 2))).tolist())
        assert rep["sparsity_per_step_layer"][0][layer] == pytest.approx(rep["sparsity_per_layer"][layer])
    with mmeff.apply(model, RectifiedSpaAttn(drop=0.75, tau=0.2, block=16, preset="none", dense_layers=(0,))) as h:
        plain = run(model, family)
    assert h.report()["per_method"]["rectified_spaattn"]["block_masks"] == {}  # off by default
    with mmeff.apply(model, cfg):
        recorded = run(model, family)
    assert torch.equal(recorded, plain)  # recording never changes the output


def test_vmoba_records_per_step_layer():
    model = model_of("wan")
    cfg = VMoBA(temporal_chunk="1", spatial_chunk="4x4", st_chunk="2x4x4", mode="topk", topk=(2, 2, 2))
    with mmeff.apply(model, cfg) as h:
        run(model, "wan")
    rep = h.report()["per_method"]["vmoba"]
    assert rep["sparsity_per_step_layer"] == {0: pytest.approx(rep["sparsity_per_layer"])}
