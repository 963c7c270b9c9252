"""A pruner and a mitigator in one apply: Python configs, spec strings, ``mmeff eval`` and the lmms-eval plugin."""
from __future__ import annotations

import json

import pytest
import torch

import mmeff
from mmeff.mitigators import VHR
from mmeff.pruners import EntropyPrune
from mmeff.zoo.load import load

from .test_oracles import _greedy, _inputs, _vhr_oracle


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
def test_pruner_plus_vhr_equals_pruner_then_plain_vhr(name):
    """mmeff's VHR on a pruned model = the plain VHR oracle on the same pruned model; it sees only the survivors."""
    model, processor = load(name)
    inputs = _inputs(processor, seed_index=1)
    n_layers = len(model.model.language_model.layers)
    layers = list(VHR().resolve_layers(n_layers))
    seen: list[int] = []
    probe = model.model.language_model.layers[layers[-1]].self_attn.o_proj.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].shape[1]))
    try:
        with mmeff.apply(model, EntropyPrune(keep=32)) as handle:
            cut = handle.report()["layer"]
            ref_tokens, ref_logits, ref_heads = _vhr_oracle(model, inputs, 2.0, layers)
        seen.clear()
        with mmeff.apply(model, "entropyprune:keep=32", "vhr") as handle:
            tokens, logits = _greedy(model, inputs)
            rep = handle.report()
    finally:
        probe.remove()
    assert layers[-1] >= cut
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert seen[0] == inputs["input_ids"].shape[1] - n_visual  # the no-image branch runs first: the text alone
    assert seen[1] == inputs["input_ids"].shape[1] - n_visual + 32  # the with-image prefill: only the kept tokens
    assert rep["method"] == "entropyprune" and rep["steering"][0]["mitigator"] == "vhr"
    assert {l: [h for _, h in v] for l, v in rep["steering"][0]["selected_heads"].items()} == ref_heads
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_two_pruners_or_two_mitigators_are_refused():
    model, _ = load("tiny-llava")
    with pytest.raises(mmeff.ConfigError, match="exactly one pruner"):
        mmeff.apply(model, "entropyprune:keep=32", "fastv:keep=32", "vhr")
    with pytest.raises(mmeff.ConfigError, match="cannot be combined with a pruner"):
        mmeff.apply(model, "entropyprune:keep=32", "gift")
    assert not hasattr(model, "_mmeff_handle")


def test_cli_eval_and_lmms_plugin_run_pruner_plus_vhr(tmp_path, monkeypatch):
    """``mmeff eval --method "entropyprune:keep=64+vhr"`` runs through the lmms-eval plugin (``method=...+vhr``)."""
    from mmeff.cli import main

    monkeypatch.setenv("MMEFF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run.json"
    rc = main(["eval", "--model", "tiny-llava", "--method", "entropyprune:keep=64+vhr", "--tasks",
               "mmeff_pope_adversarial", "--limit", "2", "--batch-size", "2", "--out", str(out), "--threads", "1",
               "--quiet", "--verbosity", "ERROR"])
    assert rc == 0
    runs = json.loads(out.read_text())["runs"]
    labels = [r["label"] for r in runs]
    assert labels == ["dense", "entropyprune:keep=64+vhr"]


def test_bench_latency_is_measured_at_a_fixed_length_and_leaves_the_model_dense():
    from mmeff.eval.halluc_bench import latency
    from mmeff.zoo.world.weak import WeakKnobs, weak_seeds

    model, processor = load("tiny-llava")
    res = latency(model, processor, ["dense", "vhr", "gift"], list(weak_seeds(1)), WeakKnobs(), new_tokens=3)
    assert set(res["methods"]) == {"dense", "vhr", "gift"} and res["new_tokens"] == 3
    assert res["methods"]["vhr"]["median_ratio_to_dense"] > 0
    assert not hasattr(model, "_mmeff_handle")
