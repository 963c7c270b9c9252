"""Pruning under static caches and torch.compile (inductor on the CPU): compiled == eager, and where graphs break.

- static cache == dynamic cache, for every family and pruner stage (eager);
- generate() compiling its decode steps with ``fullgraph=True`` (transformers' own compile path): no graph
  break and no host read on the decode path (a sync would be a break), same tokens as eager;
- ``torch.compile(model)`` on a prefill: the decision runs eagerly at a documented break outside the decoder
  layers; the compiled logits equal the eager ones.
CPU compiles are slow, so few cases run compiled: both families, a pre-LLM and the two in-LLM pruners.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig, StaticCache

import mmeff
from mmeff.hosts.vlm_base import DECISION_BREAK

from .conftest import generate, inputs_for

SPECS = ["random:ratio=0.5", "fastv:ratio=0.5,layer=1", "entropyprune:ratio=0.5,layer=1"]


def _same(a, b, atol=2e-5):
    (ta, la), (tb, lb) = a, b
    assert torch.equal(ta, tb), f"tokens differ:\n{ta.tolist()}\n{tb.tolist()}"
    torch.testing.assert_close(la, lb, atol=atol, rtol=1e-4)


def _decode_compile_config() -> CompileConfig:
    """transformers' decode-step compile, forced on the CPU (it compiles only on accelerators by default)."""
    config = CompileConfig(fullgraph=True, mode="default", backend="inductor")
    config._compile_all_devices = True
    return config


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("spec", SPECS)
def test_static_cache_equals_dynamic_cache(vlm, family, spec):
    """A fixed-size cache changes nothing: same tokens and logits as the dynamic cache (batch with padding)."""
    model = vlm(family)
    inputs = inputs_for(model, n=2)
    with mmeff.apply(model, spec) as handle:
        dynamic = generate(model, inputs, n=4)
        static = generate(model, inputs, n=4, cache_implementation="static")
        assert handle.report()["prompts"] >= 2
    _same(static, dynamic)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("options", [{"num_beams": 2}, {"do_sample": True, "num_return_sequences": 2}])
def test_static_cache_beam_search_and_sampling(vlm, family, options):
    """Rows expanded before the prompt (beams, samples) keep their decisions on a static cache too."""
    model = vlm(family)
    inputs = inputs_for(model, n=2)
    outs = []
    with mmeff.apply(model, "fastv:ratio=0.5,layer=1"):
        for cache in (None, "static"):
            torch.manual_seed(0)
            outs.append(model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, cache_implementation=cache,
                                       **options))
    assert torch.equal(outs[1], outs[0])


@pytest.mark.parametrize("spec", ["random:ratio=0.5", "fastv:ratio=0.5,layer=1"])
def test_forward_on_a_static_cache_object(vlm, spec):
    """A StaticCache passed by hand (plain forwards, LLaVA): prompt, then one token on it, equal the dynamic cache."""
    model = vlm("llava")
    inputs = inputs_for(model, n=1)
    step = {"input_ids": torch.tensor([[7]]),
            "attention_mask": torch.ones(1, inputs["input_ids"].shape[1] + 1, dtype=torch.long)}
    with mmeff.apply(model, spec):
        outs = []
        for cache in (None, StaticCache(config=model.config, max_cache_len=64)):
            first = model(**inputs, past_key_values=cache, use_cache=True)
            second = model(**step, past_key_values=first.past_key_values, use_cache=True)
            outs.append((first.logits, second.logits))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family,spec", [("llava", "random:ratio=0.5"), ("qwen2_vl", "fastv:ratio=0.5,layer=1"),
                                         ("llava", "entropyprune:ratio=0.5,layer=1")])
def test_compiled_decode_has_no_graph_break_and_matches_eager(vlm, family, spec):
    """generate() compiles each decode step with fullgraph=True: it compiles (no break, so no host sync), all
    steps share one graph (static shapes: CUDA graphs can replay it) and the tokens are the eager ones."""
    model = vlm(family)
    inputs = inputs_for(model, n=2)
    with mmeff.apply(model, spec):
        eager = generate(model, inputs, n=4, cache_implementation="static")
        torch._dynamo.reset()
        counters.clear()
        try:
            compiled = generate(model, inputs, n=4, cache_implementation="static",
                                compile_config=_decode_compile_config())
            graphs, breaks = counters["stats"]["unique_graphs"], dict(counters["graph_break"])
        finally:
            model.__dict__.pop("_compiled_call", None)  # transformers keeps the compiled call on the model
            torch._dynamo.reset()
    assert graphs == 1, f"the decode steps should share one compiled graph (static shapes), got {graphs}"
    assert breaks == {}
    _same(compiled, eager, atol=1e-4)


def _compiled_logits_and_breaks(model, inputs, backend: str) -> tuple[torch.Tensor, set[str]]:
    """Logits of ``torch.compile(model)`` and the reasons of its graph breaks (a fresh compile); a second
    call with the same prompt must reuse the compiled graphs and give the same logits."""
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = torch.compile(model, backend=backend)
        logits = compiled(**inputs).logits
        graphs = counters["stats"]["unique_graphs"]
        again = compiled(**inputs).logits  # the same prompt again: a new decision, the same graphs
        assert counters["stats"]["unique_graphs"] == graphs, "a second prompt recompiled the model"
        torch.testing.assert_close(again, logits, atol=0, rtol=0)
        return logits, set(counters["graph_break"])
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("family,spec", [("qwen2_vl", "random:ratio=0.5"), ("llava", "fastv:ratio=0.5,layer=1"),
                                         ("qwen2_vl", "entropyprune:ratio=0.5,layer=1")])
def test_compiled_prefill_breaks_only_at_the_decision_and_matches_eager(vlm, family, spec):
    """torch.compile(model) (inductor): logits equal eager; the one break mmeff adds is where a new prompt is
    read, before the LLM (every other break is the stock model's own), so the decoder layers, mmeff's layer
    hooks and the in-LLM decision compile into the graph."""
    model = vlm(family)
    inputs = inputs_for(model, n=2)
    _, stock = _compiled_logits_and_breaks(model, inputs, backend="eager")
    with mmeff.apply(model, spec):
        eager = model(**inputs).logits
        compiled, breaks = _compiled_logits_and_breaks(model, inputs, backend="inductor")
    ours = {r for r in breaks if DECISION_BREAK in r}
    assert ours and all("_start_forward" in r for r in ours), ours
    assert breaks - ours <= stock, f"mmeff added graph breaks: {breaks - ours - stock}"
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
