"""Kept-token maps: the report says exactly which visual tokens survived, and the overlay draws them in place."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

import mmeff
from mmeff.zoo.tiny_models import make_inputs
from mmeff.eval.kept_token_map import draw_kept, image_grids, kept_grids, kept_token_maps, model_view

from .conftest import FixedKeepLLM, FixedKeepPre, inputs_for

KEEP = (0, 3, 5, 14, 15)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("stage", ["pre_llm", "llm"])
def test_report_names_the_kept_visual_tokens(vlm, family, stage):
    model = vlm(family)
    inputs = inputs_for(model, n=2)
    cfg = FixedKeepPre(budget=len(KEEP), indices=KEEP) if stage == "pre_llm" else FixedKeepLLM(ratio=0.5, indices=KEEP, layer=1)
    with mmeff.apply(model, cfg) as h, torch.no_grad():
        model(**inputs)
        rep = h.report()
    assert len(rep["kept_visual_index"]) == 2
    for kept in rep["kept_visual_index"]:
        assert kept == sorted(kept) and len(set(kept)) == len(kept)
        assert set(KEEP) <= set(kept)  # the listed tokens score highest, so they are always kept
        if stage == "pre_llm":
            assert kept == list(KEEP)
    assert rep["prompts"] == 1


def test_grids_follow_each_family(vlm):
    qwen = vlm("qwen2_vl")
    inputs = make_inputs(qwen, [([2, 5], [7])], grid=(8, 12))
    assert image_grids(qwen, inputs) == [(4, 6)]  # 2x2 merge
    llava = vlm("llava")
    n = int((inputs_for(llava)["input_ids"] == llava.config.image_token_id).sum())
    side = int(n ** 0.5)
    assert image_grids(llava, inputs_for(llava)) == [(side, side)]
    with pytest.raises(ValueError, match="LLaVA-NeXT"):
        image_grids(vlm("llava_next"), inputs_for(vlm("llava_next")))


def test_kept_grids_split_per_image_and_refuse_bad_indices():
    a, b = kept_grids([0, 5, 6, 9], [(2, 3), (2, 2)])
    assert a.tolist() == [[True, False, False], [False, False, True]]
    assert b.tolist() == [[True, False], [False, True]]
    with pytest.raises(ValueError, match="out of range"):
        kept_grids([10], [(2, 3), (2, 2)])


def test_overlay_darkens_dropped_patches_only():
    img = Image.new("RGB", (40, 20), (200, 100, 50))
    grid = torch.tensor([[True, False, False, False], [False, False, False, True]])
    out = draw_kept(img, grid, dim=0.25, size=40)
    assert out.size == (40, 20)
    assert out.getpixel((5, 5)) == (200, 100, 50)        # kept cell interior
    assert out.getpixel((35, 15)) == (200, 100, 50)
    assert out.getpixel((15, 5)) == (50, 25, 12)          # dropped: x 0.25
    assert out.getpixel((5, 15)) == (50, 25, 12)


def test_llava_view_is_the_centre_crop():
    img = Image.new("RGB", (60, 30))
    assert model_view(img, "llava").size == (30, 30)
    assert model_view(img, "qwen2_vl").size == (60, 30)


def test_maps_need_a_pruned_forward(vlm):
    model = vlm("qwen2_vl")
    with pytest.raises(ValueError, match="pruned forward"):
        kept_token_maps(model, inputs_for(model), {}, [Image.new("RGB", (8, 8))])
