"""VFlowOpt keeps the host contracts on all four families (tiny random models, CPU)."""
from __future__ import annotations

import json

import pytest
import torch

import mmeff
from mmeff import BudgetError, MissingImageError, UnsupportedModelError
from mmeff.zoo import tiny_models as tm
from mmeff.core.errors import ConfigError
from mmeff.pruners import VFlowOpt
from mmeff.pruners.vflowopt_select import prune_and_recycle

from .conftest import FAMILIES, generate, inputs_for, n_hooks
from .contract_checks import assert_batch_equals_single, assert_cached_equals_slow_twin, uncached_reference

# small cells so that the tiny grids (4x4 .. 8x8 tokens) really recycle; entropy on, a low global threshold
PRUNING = dict(ratio=0.5, vit_m=2.0, alpha_v=0.5, vit_t=1.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_is_dense_and_remove_restores(vlm, family):
    model = vlm(family)
    inputs = inputs_for(model, n=2)
    ref_tokens, ref_logits = generate(model, inputs)
    with mmeff.apply(model, VFlowOpt(ratio=1.0, vit_m=2.0, alpha_v=0.5)):
        tokens, logits = generate(model, inputs)
    assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits)
    h = mmeff.apply(model, VFlowOpt(**PRUNING))
    _, pruned_logits = generate(model, inputs)
    assert not torch.equal(pruned_logits, ref_logits)
    assert h.report()["method"] == "vflowopt"
    h.remove()
    assert n_hooks(model) == 0
    tokens, logits = generate(model, inputs)
    assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_recycling_changes_the_kept_features(vlm, family):
    """Recycling is real: some kept tokens enter the LLM with merged features, the others with their own."""
    model = vlm(family)
    inputs = inputs_for(model, n=1)
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["inputs_embeds"].clone()), with_kwargs=True)
    try:
        with mmeff.apply(model, VFlowOpt(**PRUNING, llm_layers=())) as h:  # the pre-LLM cut alone
            model(**inputs)
            rep = h.report()
    finally:
        hook.remove()
    kept = rep["kept_visual_index"][0]
    n_vis = rep["visual_tokens_per_sample"][0]
    assert 0 < len(kept) < n_vis
    image = int(model.config.image_token_id)
    plain = model.model.get_input_embeddings()(inputs["input_ids"])
    feats = _dense_features(model, inputs)
    embeds = seen[0][0]
    # the kept slots appear in order where the image was; at least one of them holds a merged (new) vector
    pos = (inputs["input_ids"][0] == image).nonzero().flatten()
    first = int(pos[0])
    got = embeds[first:first + len(kept)]
    same = [torch.equal(got[j], feats[i]) for j, i in enumerate(kept)]
    assert not all(same), "no kept token carries a recycled feature"
    assert any(same), "every kept token changed"
    assert plain.shape[1] > embeds.shape[0]


def _dense_features(model, inputs):
    name = type(model).__name__
    if name.startswith("Qwen"):
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    else:
        kw = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True, **kw)
    return torch.cat(list(out.pooler_output))


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_with_padding_equals_single(vlm, family):
    model = vlm(family)
    assert_batch_equals_single(model, VFlowOpt(**PRUNING))


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generate_equals_uncached_reference(vlm, family):
    model = vlm(family)
    inputs = inputs_for(model, n=2)
    method = VFlowOpt(**PRUNING)
    assert_cached_equals_slow_twin(model, inputs, method, 5)


def test_clear_errors(vlm, tmp_path):
    model = vlm("llava")
    inputs = inputs_for(model, n=1)
    with pytest.raises(BudgetError, match="larger than the 16 visual tokens"):
        mmeff.apply(model, VFlowOpt(budget=17))
    assert n_hooks(model) == 0
    with pytest.raises(ConfigError, match="calibration file .* not found"):
        VFlowOpt(budget=8, calibration=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": "vflowopt"}))
    with pytest.raises(ConfigError, match="not a vflowopt calibration file"):
        mmeff.apply(model, VFlowOpt(budget=8, calibration=str(bad)))
    assert n_hooks(model) == 0
    with pytest.raises(ConfigError, match="vit_layer=5 does not exist"):
        mmeff.apply(model, VFlowOpt(budget=8, vit_layer=5))
    assert n_hooks(model) == 0
    with pytest.raises(ConfigError, match="keep="):
        VFlowOpt(keep=8)
    flash = tm.tiny_llava()
    flash.model.language_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="sdpa"):
        mmeff.apply(flash, VFlowOpt(budget=8))  # its LLM cuts need SDPA or eager attention
    assert n_hooks(flash) == 0
    with pytest.raises(BudgetError, match="cannot be met"):
        mmeff.apply(model, VFlowOpt(budget=8, ratio_v=1.0, ratio_1=1.0))  # the first stages alone exceed it
    assert n_hooks(model) == 0
    # features encoded before apply() carry no ViT importance: refused, not silently unpruned
    enc = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
    no_pixels = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with mmeff.apply(model, VFlowOpt(budget=8)):
        with pytest.raises(MissingImageError, match="pixels"):
            model(**no_pixels, mm_encoder_outputs={"image": enc})
        # encoded while applied (as generate() does), they carry the maps and prune
        enc = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
        assert model(**no_pixels, mm_encoder_outputs={"image": enc}).logits.shape[1] < inputs["input_ids"].shape[1]


def _image_maps(model, inputs):
    if type(model).__name__.startswith("Qwen"):
        return model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                              return_dict=True).vflowopt_maps
    kw = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
    return model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True, **kw).vflowopt_maps


@pytest.mark.parametrize("family", FAMILIES)
def test_llm_cuts_keep_the_most_important_of_what_the_vision_stage_kept(vlm, family):
    """The two LLM cuts rank by the ViT importance carried from the vision stage (nested top-k of one score)."""
    model = vlm(family)
    inputs = inputs_for(model, n=2)
    method = VFlowOpt(ratio=0.5, vit_m=2.0, alpha_v=0.5, vit_t=1.0, ratio_v=0.8, ratio_1=0.7)
    with torch.no_grad(), mmeff.apply(model, method) as h:
        maps = _image_maps(model, inputs)
        model(**inputs)
        rep = h.report()
    assert rep["cut_layers"] == [0, 1, 3]  # 4 LLM layers: round(L/3), round(2L/3)
    counts = rep["kept_per_cut_per_sample"]
    for b, image in enumerate(maps):
        n = image.importance.numel()
        first, _ = prune_and_recycle(image.importance, image.coords, image.region, round(n * 0.8), 2.0)
        assert counts[0][b] == first.numel() == round(n * 0.8)
        assert counts[1][b] == round(first.numel() * 0.7)
        carried = image.importance[first]
        kept = torch.tensor(rep["kept_visual_index"][b], dtype=torch.long)
        assert set(kept.tolist()) <= set(first.tolist())
        # equal up to ties (LLaVA-NeXT's newline tokens all have importance 1): the same importance values
        expected = torch.topk(carried, counts[2][b]).values
        assert torch.equal(image.importance[kept].sort().values, expected.sort().values)
    assert rep["equivalent_budget"] == pytest.approx(sum(
        (n1 * 1 + n2 * 2 + n3 * 1) / 4 for n1, n2, n3 in zip(*counts)) / len(maps), abs=1e-6)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_released_count_flows_through_the_llm_cuts(vlm, family):
    """count='released' keeps more than round(N r_v) before the LLM; the LLM cuts then work on what was kept."""
    model = vlm(family)
    inputs = inputs_for(model, n=2)
    method = VFlowOpt(ratio=0.5, vit_m=1.5, alpha_v=0.5, vit_t=1.0, ratio_v=0.6, ratio_1=0.7, count="released")
    with torch.no_grad(), mmeff.apply(model, method) as h:
        maps = _image_maps(model, inputs)
        tokens, logits = generate(model, inputs, n=4)
        rep = h.report()
    counts = rep["kept_per_cut_per_sample"]
    for b, image in enumerate(maps):
        first, _ = prune_and_recycle(image.importance, image.coords, image.region,
                                     round(image.importance.numel() * 0.6), 1.5, "released")
        assert counts[0][b] == first.numel() > round(image.importance.numel() * 0.6)
        kept = torch.tensor(rep["kept_visual_index"][b], dtype=torch.long)
        assert set(kept.tolist()) <= set(first.tolist())
        # the cuts rank *every* token the pre-LLM cut kept (also those beyond round(N r_v))
        expected = torch.topk(image.importance[first], counts[2][b]).values
        assert torch.equal(image.importance[kept].sort().values, expected.sort().values)
    ref_tokens, ref_logits = uncached_reference(model, inputs, method, 4)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
