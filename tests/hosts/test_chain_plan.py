"""The generalised plan: a chain of in-LLM cuts (and a pre-LLM stage before it) on all four families.

Same contracts as the one-cut case (test_vlm_contracts.py): keep-all == dense, cached == uncached twin,
a padded batch == each sample alone; plus what only a chain has: per-layer counts, carried per-token values.
"""
from __future__ import annotations

import pytest
import torch

import mmeff
from mmeff import ConfigError

from . import conftest
from .conftest import FAMILIES, ChainLLM, ChainPre, generate, inputs_for, n_hooks
from .contract_checks import assert_cached_equals_slow_twin, take_sample

METHODS = {"llm": lambda: ChainLLM(ratio=0.5), "pre": lambda: ChainPre(ratio=0.5)}


@pytest.mark.parametrize("family", FAMILIES)
def test_chain_keep_all_is_exact(vlm, family):
    model = vlm(family)
    inputs = inputs_for(model, n=2)
    ref = generate(model, inputs, n=4)
    for cls in (ChainLLM, ChainPre):
        with mmeff.apply(model, cls(ratio=1.0, fractions=(1.0, 1.0, 1.0))):
            out = generate(model, inputs, n=4)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    h = mmeff.apply(model, ChainLLM(ratio=0.5))
    assert not torch.equal(generate(model, inputs, n=4)[1], ref[1])
    h.remove()
    assert n_hooks(model) == 0
    out = generate(model, inputs, n=4)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["llm", "pre"])
def test_chain_cached_equals_uncached(vlm, family, kind):
    model = vlm(family)
    inputs = inputs_for(model, n=2)
    method = METHODS[kind]()
    assert_cached_equals_slow_twin(model, inputs, method, 4)


def test_chain_cached_equals_uncached_eager(vlm):
    model = vlm("llava", "eager")
    inputs = inputs_for(model, n=2)
    method = ChainLLM(ratio=0.5)
    assert_cached_equals_slow_twin(model, inputs, method, 4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["llm", "pre"])
def test_chain_batch_equals_single(vlm, family, kind):
    model = vlm(family)
    batch = inputs_for(model, n=3)
    with mmeff.apply(model, METHODS[kind]()) as handle:
        tokens, logits = generate(model, batch, n=4)
        kept_batch = handle.report()["kept_visual_index"]
        for i in range(3):
            one = take_sample(inputs_for(model, n=3), i, model)
            t1, l1 = generate(model, one, n=4)
            assert handle.report()["kept_visual_index"][0] == kept_batch[i]
            assert torch.equal(tokens[i, -4:], t1[0, -4:]), f"sample {i} differs"
            torch.testing.assert_close(logits[i], l1[0], atol=5e-5, rtol=1e-4)


def test_chain_report_and_carried_values(vlm):
    model = vlm("llava")
    inputs = inputs_for(model, n=2)
    conftest.CHAIN_SEEN.clear()
    with mmeff.apply(model, ChainLLM(ratio=0.5, cuts=(1, 2, 3), fractions=(0.75, 0.5, 0.25))) as handle:
        model(**inputs)
        rep = handle.report()
    n = rep["visual_tokens_per_sample"][0]
    assert rep["cut_layers"] == [1, 2, 3]
    assert rep["visual_tokens_per_layer"] == [n, 0.75 * n, 0.5 * n, 0.25 * n]
    assert rep["equivalent_budget"] == pytest.approx((n + 0.75 * n + 0.5 * n + 0.25 * n) / 4)
    assert rep["equal_token_budget"] == pytest.approx((0.75 * n + 0.5 * n + 0.25 * n + 0.25 * n) / 4)
    assert rep["kept_per_cut_per_sample"] == [[n * 3 // 4] * 2, [n // 2] * 2, [n // 4] * 2]
    # the carried values are the original indices of the surviving tokens, cut after cut
    for b in range(2):
        seen = [c for c in conftest.CHAIN_SEEN if c[1] == b]
        assert [c[0] for c in seen] == [0, 1, 2]
        assert seen[0][2] == list(range(n))
        for (_, _, before, _), (_, _, after, spans) in zip(seen, seen[1:]):
            assert set(after) < set(before) and after == sorted(after)
            assert spans == [(0, len(after))]
        assert set(rep["kept_visual_index"][b]) < set(seen[2][2])
        assert len(rep["kept_visual_index"][b]) == n // 4


def test_chain_errors(vlm):
    model = vlm("llava")
    for bad in (ChainLLM(ratio=0.5, cuts=(2, 2)), ChainLLM(ratio=0.5, cuts=(1, 9)), ChainLLM(ratio=0.5, cuts=(0, 2))):
        with pytest.raises(ConfigError):
            mmeff.apply(model, bad)
        assert n_hooks(model) == 0
