"""Contracts of the hallucination mitigators (VHR, GIFT) on all four VLM hosts, SDPA, batch > 1."""
from __future__ import annotations

import pytest
import torch

import mmeff
from mmeff import ConfigError, IncompatibleFeatureError, MissingImageError
from mmeff.mitigators import GIFT, VHR

from .conftest import FAMILIES, generate, inputs_for, n_hooks
from .contract_checks import assert_batch_equals_single, uncached_reference

NO_OP = {"vhr": VHR(alpha=1.0), "gift": GIFT(alpha=0.0)}
ACTIVE = {"vhr": VHR(alpha=2.0), "gift": GIFT(alpha=5.0)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["vhr", "gift"])
def test_no_op_setting_is_dense_and_remove_restores(vlm, family, name):
    model = vlm(family)
    inputs = inputs_for(model, n=2)
    ref_tokens, ref_logits = generate(model, inputs)
    with mmeff.apply(model, NO_OP[name]):
        tokens, logits = generate(model, inputs)
    assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits)
    handle = mmeff.apply(model, ACTIVE[name])
    _, steered = generate(model, inputs)
    assert not torch.allclose(steered, ref_logits, atol=1e-3)  # it does something
    handle.remove()
    assert n_hooks(model) == 0
    tokens, logits = generate(model, inputs)
    assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["vhr", "gift"])
def test_batch_with_padding_equals_each_sample_alone(vlm, family, name):
    model = vlm(family)
    assert_batch_equals_single(model, ACTIVE[name])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["vhr", "gift"])
def test_cached_generation_equals_slow_twin(vlm, family, name):
    """The heads / weights decided on the prompt are reused by every later forward, cached or not."""
    model = vlm(family)
    inputs = inputs_for(model, n=2)
    with mmeff.apply(model, ACTIVE[name]):
        tokens, logits = generate(model, inputs, n=5)
    ref_tokens, ref_logits = uncached_reference(model, inputs, ACTIVE[name], 5)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_gift_sdpa_bias_equals_eager_attention(vlm, family):
    """The same GIFT run through SDPA (float mask) and through eager attention gives the same logits."""
    inputs = inputs_for(vlm(family), n=2)
    out = {}
    for attn in ("sdpa", "eager"):
        with mmeff.apply(vlm(family, attn), GIFT(alpha=5.0)):
            out[attn] = generate(vlm(family, attn), inputs)
    assert torch.equal(out["sdpa"][0], out["eager"][0])
    torch.testing.assert_close(out["sdpa"][1], out["eager"][1], atol=1e-5, rtol=1e-4)


def test_vhr_keeps_sdpa_and_reports_heads(vlm):
    model = vlm("llava")
    with mmeff.apply(model, "vhr") as handle:
        generate(model, inputs_for(model, n=2), n=2)
        rep = handle.report()["steering"][0]
    assert model.config.text_config._attn_implementation == "sdpa"
    assert rep["layers"] == [1, 2, 3] and rep["prompts"] == 1
    assert all(len(v) == 2 * 2 for v in rep["selected_heads"].values())  # 2 samples x (4 heads above the median)


def test_clear_errors_and_nothing_half_applied(vlm):
    model = vlm("llava")
    with pytest.raises(ConfigError, match="at most one mitigator"):
        mmeff.apply(model, VHR(), GIFT())
    with pytest.raises(ConfigError, match="does not exist"):
        mmeff.apply(model, VHR(layers=(9,)))
    with pytest.raises(ConfigError, match="after the saliency"):
        mmeff.apply(model, GIFT(saliency_layers=(2,), layers=(1, 2)))
    with pytest.raises(ConfigError, match="alpha"):
        VHR(alpha=0)
    assert n_hooks(model) == 0
    text_only = {"input_ids": torch.tensor([[2, 5, 6, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with mmeff.apply(model, VHR()):
        with pytest.raises(MissingImageError, match="needs an image"):
            model(**text_only)
    right = inputs_for(model, n=2, padding="right")
    with mmeff.apply(model, GIFT()):
        with pytest.raises(IncompatibleFeatureError, match="left padding"):
            model(**right)



# ---------------------------------------------------------------------------------------------- GIFT with a pruner
COMPOSED = ["entropyprune:keep=12,layer=1", "fastv:keep=8,layer=2", "random:keep=12"]
# cut at the saliency layer (1 of 4), cut between saliency and enhancement (weights mapped), pre-LLM


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", COMPOSED)
def test_pruner_plus_gift_batch_with_padding_equals_each_sample_alone(vlm, family, spec):
    model = vlm(family)
    assert_batch_equals_single(model, [spec, GIFT(alpha=5.0)])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("spec", COMPOSED)
def test_pruner_plus_gift_cached_equals_slow_twin(vlm, family, spec):
    model = vlm(family)
    inputs = inputs_for(model, n=2)
    methods = [spec, GIFT(alpha=5.0)]
    with mmeff.apply(model, *methods):  
        tokens, logits = generate(model, inputs, n=5)
    ref_tokens, ref_logits = uncached_reference(model, inputs, methods, 5)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("spec", COMPOSED)
def test_pruner_plus_gift_no_op_is_the_pruner_and_remove_restores(vlm, family, spec):
    model = vlm(family)
    inputs = inputs_for(model, n=2)
    dense = generate(model, inputs)
    with mmeff.apply(model, spec):
        pruned = generate(model, inputs)
    with mmeff.apply(model, spec, GIFT(alpha=0.0)):
        no_op = generate(model, inputs)
    assert torch.equal(no_op[0], pruned[0]) and torch.equal(no_op[1], pruned[1])
    handle = mmeff.apply(model, spec, GIFT(alpha=5.0))
    try:
        steered = generate(model, inputs)
    finally:
        handle.remove()
    assert not torch.allclose(steered[1], pruned[1], atol=1e-3)  # it does something on the pruned model
    assert n_hooks(model) == 0
    after = generate(model, inputs)
    assert torch.equal(after[0], dense[0]) and torch.equal(after[1], dense[1])
