"""AdaptInfer on the four hosts: the contracts of DESIGN.md (tiny random models, CPU)."""
from __future__ import annotations

import json

import pytest
import torch

import mmeff
from mmeff import BudgetError, ConfigError, UnsupportedModelError
from mmeff.pruners import AdaptInfer

from .conftest import FAMILIES, build, generate, inputs_for, n_hooks
from .contract_checks import assert_cached_equals_slow_twin, take_sample


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_is_dense_and_remove_is_exact(vlm, family):
    model = vlm(family)
    inputs = inputs_for(model, n=2)
    ref = generate(model, inputs, n=4)
    with mmeff.apply(model, AdaptInfer(ratio=1.0)) as h:
        out = generate(model, inputs, n=4)
        assert h.report()["cut_layers"] == [1, 2, 3]
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    h = mmeff.apply(model, AdaptInfer(ratio=0.4))
    assert not torch.equal(generate(model, inputs, n=4)[1], ref[1])
    h.remove()
    assert n_hooks(model) == 0
    out = generate(model, inputs, n=4)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@pytest.mark.parametrize("family,recycle", [(f, False) for f in FAMILIES] + [("llava_next", True), ("qwen2_vl", True)])
def test_padded_batch_equals_each_alone(vlm, family, recycle):
    model = vlm(family)
    batch = inputs_for(model, n=3)
    method = AdaptInfer(ratio=0.4, recycle=recycle, recycle_ratio=0.6)
    with mmeff.apply(model, method) as handle:
        tokens, logits = generate(model, batch, n=4)
        kept = handle.report()["kept_visual_index"]
        for i in range(3):
            t1, l1 = generate(model, take_sample(inputs_for(model, n=3), i, model), n=4)
            assert handle.report()["kept_visual_index"][0] == kept[i]
            assert torch.equal(tokens[i, -4:], t1[0, -4:]), f"sample {i} differs"
            torch.testing.assert_close(logits[i], l1[0], atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_equals_slow_twin(vlm, family):
    model = vlm(family)
    inputs = inputs_for(model, n=2)
    for method in (AdaptInfer(ratio=0.4), AdaptInfer(ratio=0.4, recycle=True, recycle_ratio=0.6)):
        assert_cached_equals_slow_twin(model, inputs, method, 4)


def test_reindexed_positions_cached_equals_slow_twin(vlm):
    """The release's position policy (contiguous per stage, so a decode token's position differs per layer)."""
    model = vlm("llava")
    inputs = inputs_for(model, n=2)
    method = AdaptInfer(ratio=0.4, positions="reindex")
    _, logits = assert_cached_equals_slow_twin(model, inputs, method, 4)
    with mmeff.apply(model, AdaptInfer(ratio=0.4)):
        assert not torch.equal(generate(model, inputs, n=4)[1], logits)


def test_recycling_keeps_merged_tokens(vlm):
    model = vlm("llava")
    inputs = inputs_for(model, n=1)
    with mmeff.apply(model, AdaptInfer(keeps=(6, 3, 1))) as h:
        model(**inputs)
        plain = h.report()["kept_per_cut_per_sample"]
    with mmeff.apply(model, AdaptInfer(keeps=(6, 3, 1), recycle=True, recycle_ratio=1.0)) as h:
        out = model(**inputs)
        rec = h.report()["kept_per_cut_per_sample"]
    assert plain == [[6], [3], [1]]
    assert rec[0] == [6 + 2]  # 10 dropped tokens, all recycled: 10 // 10 + 1 = 2 merged tokens
    assert torch.isfinite(out.logits).all()


def test_errors(vlm, tmp_path):
    model = vlm("llava")
    with pytest.raises(BudgetError, match="cannot be met"):
        mmeff.apply(model, AdaptInfer(budget=3, layers=(1, 2)))       # 2 of 4 layers already see all 16
    with pytest.raises(BudgetError, match="leaves no layer"):
        mmeff.apply(model, AdaptInfer(budget=8, layers=(1, 3)))       # the cut after layer 3 does not exist
    with pytest.raises(ConfigError, match="2 keep entries for the 3"):
        mmeff.apply(model, AdaptInfer(keeps=(8, 4)))
    with pytest.raises(BudgetError, match="more than the 16"):
        mmeff.apply(model, AdaptInfer(keeps=(17, 4, 2)))
    with pytest.raises(ConfigError, match="mmeff calibrate adaptinfer"):
        AdaptInfer(budget=8, schedule=str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="exactly one of"):
        AdaptInfer(budget=8, keeps=(4, 2, 1))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"method": "adaptinfer", "layers": [0, 1], "n_layers": 28}))
    with pytest.raises(ConfigError, match="28-layer"):
        mmeff.apply(model, AdaptInfer(budget=8, schedule=str(other)))
    assert n_hooks(model) == 0
    flash = build("llava")
    flash.model.language_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="sdpa"):
        mmeff.apply(flash, AdaptInfer(budget=8))
    assert n_hooks(flash) == 0


def test_schedule_file_sets_the_layers(vlm, tmp_path):
    model = vlm("qwen2_vl")
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"method": "adaptinfer", "layers": [0, 2], "n_layers": 4}))
    with mmeff.apply(model, AdaptInfer(keeps=(8, 2), schedule=str(path))) as h:
        model(**inputs_for(model, n=1))
        rep = h.report()
    assert rep["cut_layers"] == [1, 3]
    assert rep["visual_tokens_per_layer"] == [16, 8, 8, 2]
    assert rep["equal_token_budget"] == pytest.approx((8 + 8 + 2 + 2) / 4)
