"""Contracts of the VLM host adapters on all four families (tiny random models, CPU)."""
from __future__ import annotations

import pytest
import torch

import mmeff
from mmeff import AlreadyAppliedError, BudgetError, MissingImageError, UnsupportedModelError
from mmeff.pruners import EntropyPrune, FastV, RandomPrune

from .conftest import FAMILIES, FixedKeepLLM, FixedKeepPre, generate, inputs_for, n_hooks
from .contract_checks import assert_batch_equals_single, assert_cached_equals_slow_twin, take_sample, uncached_reference

KEEP_ALL = {
    "fastv": lambda n: FastV(ratio=1.0, layer=1),
    "entropyprune": lambda n: EntropyPrune(ratio=1.0),
    "random": lambda n: RandomPrune(ratio=1.0),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_everything_is_exact_and_remove_restores(vlm, family, attn):
    model = vlm(family, attn)
    inputs = inputs_for(model, n=2)
    ref_tokens, ref_logits = generate(model, inputs)
    for make in KEEP_ALL.values():
        with mmeff.apply(model, make(0)):
            tokens, logits = generate(model, inputs)
        assert torch.equal(tokens, ref_tokens)
        assert torch.equal(logits, ref_logits)
    # a real pruning run, then remove(): bit-for-bit the original again
    h = mmeff.apply(model, FastV(ratio=0.5, layer=1))
    pruned_tokens, pruned_logits = generate(model, inputs)
    assert not torch.equal(pruned_logits, ref_logits)
    h.remove()
    assert n_hooks(model) == 0
    tokens, logits = generate(model, inputs)
    assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stage", ["llm", "pre_llm"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_generate_equals_uncached_reference(vlm, family, stage, attn):
    model = vlm(family, attn)
    inputs = inputs_for(model, n=2)
    cls = FixedKeepLLM if stage == "llm" else FixedKeepPre
    method = cls(budget=5, layer=1 if stage == "llm" else None, indices=(0, 3, 4, 9, 15))
    if family == "llava_next":  # variable token counts: keep by ratio of each image
        method = cls(ratio=0.6, layer=1 if stage == "llm" else None, indices=(0, 3, 4, 9, 15, 20))
    assert_cached_equals_slow_twin(model, inputs, method, 5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", ["fastv:ratio=0.4,layer=1", "entropyprune:ratio=0.6,layer=1", "random:ratio=0.3"])
def test_batch_with_padding_equals_single(vlm, family, spec):
    model = vlm(family)
    assert_batch_equals_single(model, spec)


def _layer0_rope(model):
    """Capture (cos) handed to LLM layer 0 on every forward."""
    seen = []
    layer0 = model.model.language_model.layers[0]
    h = layer0.register_forward_pre_hook(lambda m, a, k: seen.append(k["position_embeddings"][0][:, -1].clone()),
                                         with_kwargs=True)
    return seen, h


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("spec", ["random:budget=5", "fastv:budget=10,layer=1", "zooprune:budget=5,directions=4"])
def test_qwen_decode_positions_after_pruning(vlm, family, spec):
    model = vlm(family)
    inputs = inputs_for(model, n=1)
    # generate(): decode positions equal the unpruned run's
    seen, h = _layer0_rope(model)
    generate(model, inputs, n=4)
    dense = list(seen)
    seen.clear()
    with mmeff.apply(model, spec):
        generate(model, inputs, n=4)
    h.remove()
    for a, b in zip(dense[1:], seen[1:]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # plain forward + cache continuation: rope_deltas stay the unpruned ones (generate() adds them to positions
    # counted on the full sequence); the adapter itself places new tokens after the removed ones
    out = model(**inputs, use_cache=True)
    dense_delta = model.model.rope_deltas.clone()
    nxt = out.logits[:, -1:].argmax(-1)
    seen, h = _layer0_rope(model)
    model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    dense_next = seen[-1]
    with mmeff.apply(model, spec) as handle:
        out = model(**inputs, use_cache=True)
        removed = inputs["input_ids"].shape[1] - out.past_key_values.get_seq_length()
        if handle.report()["stage"] == "pre_llm":
            assert removed > 0
            assert torch.equal(model.model.rope_deltas, dense_delta)
        model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    h.remove()
    torch.testing.assert_close(seen[-1], dense_next, atol=0, rtol=0)


def test_fastv_scores_match_eager_attention_row(vlm):
    """The row-only score service equals the eager attention map's last row (no L x L map needed)."""
    model = vlm("llava", "eager")
    inputs = inputs_for(model, n=2)
    out = model(**inputs, output_attentions=True)
    att = out.attentions[0]  # layer 0 = K-1 for K=1
    captured = {}
    h = mmeff.apply(model, FastV(ratio=1.0, layer=1))
    adapter_hook = h._hooks  # noqa: F841 - keep handle alive
    from mmeff.hosts import vlm_base

    orig = vlm_base.VLMAdapter.last_query_attention

    def spy(self):
        captured["a"] = orig(self)
        return captured["a"]

    vlm_base.VLMAdapter.last_query_attention = spy
    try:
        with mmeff.apply(model, FastV(ratio=0.5, layer=1)) if False else h:
            h.remove()
        with mmeff.apply(model, FastV(ratio=0.5, layer=1)):
            model(**inputs)
    finally:
        vlm_base.VLMAdapter.last_query_attention = orig
    expected = att[:, :, -1, :].float()
    torch.testing.assert_close(captured["a"], expected, atol=1e-5, rtol=1e-4)


def test_report_counts_and_budget(vlm):
    model = vlm("llava")
    inputs = inputs_for(model, n=1)
    with mmeff.apply(model, EntropyPrune(budget=12, layer=2)) as h:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    rep = h.report()
    keep = int((4 * 12 - 2 * 16) / (4 - 2))
    assert rep["visual_tokens_per_layer"] == [16, 16, keep, keep]
    assert rep["equivalent_budget"] == pytest.approx(12)
    assert rep["visual_tokens_input"] == 16
    assert 0 < rep["prefill_tflops"]["ratio"] < 1
    assert rep["method_seconds"] > 0


def test_errors_leave_nothing_applied(vlm):
    model = vlm("llava")
    inputs = inputs_for(model, n=1)
    ref, _ = generate(model, inputs)
    with pytest.raises(UnsupportedModelError, match="supported hosts"):
        mmeff.apply(torch.nn.Linear(2, 2), "fastv:budget=8")
    with pytest.raises(BudgetError, match="larger than the 16 visual tokens"):
        mmeff.apply(model, FastV(budget=17))
    with pytest.raises(BudgetError, match="cannot be met"):
        mmeff.apply(model, FastV(budget=2, layer=2))
    assert n_hooks(model) == 0
    with mmeff.apply(model, "fastv:budget=10,layer=1"):
        with pytest.raises(AlreadyAppliedError, match="handle.remove"):
            mmeff.apply(model, "random:budget=4")
        text_only = {"input_ids": torch.tensor([[2, 5, 6, 7]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
        with pytest.raises(MissingImageError, match="no image tokens"):
            model.generate(**text_only, max_new_tokens=2)
        tokens, _ = generate(model, inputs)  # still works after the error
    assert n_hooks(model) == 0
    out, _ = generate(model, inputs)
    assert torch.equal(out, ref)


def test_budget_above_available_at_runtime_for_variable_images(vlm):
    model = vlm("llava_next")
    inputs = inputs_for(model, n=1)
    with mmeff.apply(model, RandomPrune(budget=1000)):
        with pytest.raises(BudgetError, match="visual tokens of this image"):
            model(**inputs)
    assert n_hooks(model) == 0


def test_spec_strings_equal_configs(vlm):
    assert mmeff.parse_method("entropyprune:budget=64,layer=2") == EntropyPrune(budget=64, layer=2)
    assert mmeff.parse_method("random:ratio=0.25,seed=3") == RandomPrune(ratio=0.25, seed=3)
    with pytest.raises(mmeff.UnknownMethodError):
        mmeff.parse_method("nosuch:budget=3")
    with pytest.raises(mmeff.ConfigError, match="unknown option"):
        mmeff.parse_method("fastv:budgt=3")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_reindex_positions_cached_equals_uncached(vlm, attn):
    model = vlm("llava", attn)
    inputs = inputs_for(model, n=2)
    for cls, layer in ((FixedKeepLLM, 1), (FixedKeepPre, None)):
        method = cls(budget=5, layer=layer, indices=(1, 2, 8, 9, 14), positions="reindex")
        with mmeff.apply(model, method):
            tokens, logits = generate(model, inputs, n=4)
        ref_tokens, ref_logits = _uncached_reference_reindex(model, inputs, method, 4)
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)


def _uncached_reference_reindex(model, inputs, method, n_new):
    # Under reindex, positions of later tokens are contiguous after the removed ones: the uncached run
    # under the same handle with generate-style positions gives the reference.
    return uncached_reference(model, inputs, method, n_new)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", ["fastv:ratio=0.4,layer=1", "random:ratio=0.3"])
def test_right_padding_forward_equals_single(vlm, family, spec):
    """Right-padded batch through a plain forward: each sample's last real logits equal its solo run."""
    model = vlm(family)
    batch = inputs_for(model, n=3, padding="right")
    pads = (batch["attention_mask"] == 0).sum(1)
    with mmeff.apply(model, spec):
        out = model(**batch)
        new_len = out.logits.shape[1]
        for i in range(3):
            solo = model(**take_sample(batch, i, model)).logits[0, -1]
            torch.testing.assert_close(out.logits[i, new_len - 1 - int(pads[i])], solo, atol=5e-5, rtol=1e-4)


def test_score_service_rows_and_keys_match_eager_attention(vlm):
    """Text-row attention and key states from the service equal eager attention / k_proj+RoPE (batch, padding)."""
    import dataclasses
    from typing import ClassVar

    from mmeff.core.registry import register_method
    from mmeff.pruners.base import PrunerConfig

    seen = {}

    @register_method
    @dataclasses.dataclass(frozen=True)
    class Spy(PrunerConfig):
        name: ClassVar[str] = "test_spy_rows"

        def score(self, view):
            seen[view.sample] = (view.text_rows_attention(), view.key_states(), view.query_states())
            return torch.zeros(view.n_visual)

    model = vlm("llava", "eager")
    inputs = inputs_for(model, n=2)
    out = model(**inputs, output_attentions=True)
    with mmeff.apply(model, Spy(ratio=1.0, layer=2)):
        model(**inputs)
    att = out.attentions[1]  # layer K-1
    image_id = model.config.image_token_id
    for b in range(2):
        ids, mask = inputs["input_ids"][b], inputs["attention_mask"][b]
        vis = torch.nonzero(ids == image_id).flatten()
        rows = torch.arange(int(vis[-1]) + 1, ids.shape[0])
        rows = rows[mask[rows].bool()]
        expected = att[b][:, rows][:, :, vis].float()
        torch.testing.assert_close(seen[b][0], expected, atol=1e-5, rtol=1e-4)
        q, k = seen[b][2], seen[b][1]
        assert q.shape == k.shape == (vis.numel(), 4, 16)
        # the visual-to-visual block of eager attention, renormalised, is softmax(q k^T * scale) under causality
        block = att[b][:, vis][:, :, vis].float()
        block = block / block.sum(-1, keepdim=True)
        logits = torch.einsum("ihd,jhd->hij", q.float(), k.float()) * model.config.text_config.head_dim ** -0.5
        causal = torch.ones(vis.numel(), vis.numel(), dtype=torch.bool).tril()
        mine = logits.masked_fill(~causal, float("-inf")).softmax(-1)
        torch.testing.assert_close(mine, block, atol=1e-5, rtol=1e-4)
