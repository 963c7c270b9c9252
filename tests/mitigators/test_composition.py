"""A pruner and a mitigator in one apply: Python configs, spec strings, ``mmeff eval`` and the lmms-eval plugin."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AttentionInterface

import mmeff
from mmeff.mitigators import GIFT, VHR
from mmeff.pruners import EntropyPrune
from mmeff.zoo.load import load

from .test_oracles import _GiftOracle, _greedy, _inputs, _vhr_oracle


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


class _MappedGiftOracle(_GiftOracle):
    """The plain GIFT oracle whose saliency layer sees one sequence and whose enhancement layers see a shorter
    one (a cut between them): after the saliency, the weights of the surviving visual tokens are carried over."""

    def __init__(self, *args, enh_vis: list[int], enh_query: list[int], carried: list[int]):
        super().__init__(*args)
        self.enh_vis, self.enh_query, self.carried = enh_vis, enh_query, carried

    def saliency(self, probs):
        super().saliency(probs)
        self.w = self.w[self.carried]
        self.vis, self.query = self.enh_vis, self.enh_query


class _AnyOf(frozenset):
    """``layer == _AnyOf({a, b})`` is membership (the base oracle compares its one saliency layer with ``==``)."""

    def __eq__(self, other):
        return other in self

    __hash__ = frozenset.__hash__


class _TwoSaliencyOracle(_GiftOracle):
    """Saliency layers on both sides of a cut: the later layer's saliency is over the kept visual tokens, the earlier
    one's is read at them (``carried``), the two are averaged, clipped and normalised as usual."""

    def __init__(self, *args, enh_vis: list[int], enh_query: list[int], carried: list[int]):
        super().__init__(*args)
        self.enh_vis, self.enh_query, self.carried = enh_vis, enh_query, carried
        self.layer_s: list[np.ndarray] = []

    def saliency(self, probs):
        rows = [self.query[0] - 1] + self.query
        a = probs[:, rows][:, :, self.vis]
        shift = np.maximum(a[:, 1:] - a[:, :-1], 0.0)
        keep = [i for i, f in enumerate(self.informative) if f] or list(range(len(self.query)))
        shift = shift[:, keep]
        heads = np.argsort(-shift.sum((1, 2)), kind="stable")[: probs.shape[0] // 2]
        self.layer_s.append(shift[heads].mean((0, 1)))
        self.vis, self.query = self.enh_vis, self.enh_query
        if len(self.layer_s) < 2:
            return
        s = (self.layer_s[0][self.carried] + self.layer_s[1]) / 2
        s = np.clip(s, s.mean() - 3 * s.std(), s.mean() + 3 * s.std())
        s = (s - s.min()) / (s.max() - s.min())
        self.w = np.exp(self.alpha * s)


QUESTION = "Is there a red circle in the image?"


def _apply_to_oracle_model(ref_model, pruner: str):
    """Apply the pruner to a model whose attention is the oracle's function. The host admits in-LLM cuts only on
    SDPA / eager models (it reads no attention weights, so any exact attention works); the check is made at apply."""
    cfg = ref_model.model.language_model.config
    impl = cfg._attn_implementation
    cfg._attn_implementation = "eager"
    try:
        return mmeff.apply(ref_model, pruner)
    finally:
        cfg._attn_implementation = impl


def _layout(model, processor, inputs):
    """Prompt positions of the image tokens and of the question; the question's informative flags."""
    ids = inputs["input_ids"][0].tolist()
    vis = [i for i, t in enumerate(ids) if t == model.config.image_token_id]
    q_ids = processor.tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    start = next(i for i in range(vis[-1], len(ids)) if ids[i:i + len(q_ids)] == q_ids)
    pieces = processor.tokenizer.convert_ids_to_tokens(q_ids)
    informative = [p.strip("▁").lower() in {"red", "circle", "image"} for p in pieces]
    return len(ids), vis, list(range(start, start + len(q_ids))), informative


def _kept_coordinates(length: int, vis: list[int], kept_index: list[int], query: list[int]):
    """Slots of the kept visual tokens and of the question in the pruned sequence (batch 1: no fillers)."""
    kept = [vis[i] for i in kept_index]
    seq = sorted(set(range(length)) - set(vis) | set(kept))
    slot = {p: j for j, p in enumerate(seq)}
    return [slot[p] for p in kept], [slot[p] for p in query]


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
@pytest.mark.parametrize("pruner", ["entropyprune:keep=32", "random:keep=32", "fastv:keep=48"])
def test_pruner_plus_gift_equals_pruner_then_plain_gift(name, pruner):
    """mmeff's GIFT on a pruned model = the plain GIFT oracle (eager attention) on the same pruned model, with the
    visual and question columns of the kept sequence; the saliency layer sees only the kept tokens."""
    model, processor = load(name)
    inputs = _inputs(processor, QUESTION)
    length, vis, query, informative = _layout(model, processor, inputs)
    sal, enh = GIFT().resolve(len(model.model.language_model.layers))
    with mmeff.apply(model, pruner) as handle:
        _greedy(model, inputs)
        rep = handle.report()
    cut, kept_index = rep["cut_layers"][0], rep["kept_visual_index"][0]
    assert cut <= sal[0] and len(kept_index) < len(vis)
    k_vis, k_query = _kept_coordinates(length, vis, kept_index, query)
    oracle = _GiftOracle(type(model.model.language_model.layers[0].self_attn), sal[0], set(enh), 5.0, k_vis, k_query,
                         informative)
    AttentionInterface.register("mmeff_gift_oracle", oracle.attention)
    ref_model, _ = load(name, attn_implementation="mmeff_gift_oracle")
    with _apply_to_oracle_model(ref_model, pruner) as handle:
        ref_tokens, ref_logits = _greedy(ref_model, inputs)
        assert handle.report()["kept_visual_index"][0] == kept_index
    seen: list[int] = []
    probe = model.model.language_model.layers[sal[0]].self_attn.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["hidden_states"].shape[1]), with_kwargs=True)
    try:
        with mmeff.apply(model, pruner, GIFT(alpha=5.0)) as handle:
            tokens, logits = _greedy(model, inputs)
            rep = handle.report()
    finally:
        probe.remove()
    assert seen[0] == length - len(vis) + len(kept_index)  # the saliency layer's prefill: only the kept tokens
    assert rep["method"] == pruner.split(":")[0] and rep["steering"][0]["mitigator"] == "gift"
    assert rep["kept_visual_index"][0] == kept_index
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    with mmeff.apply(model, pruner):
        pruned_logits = _greedy(model, inputs)[1]
    assert (pruned_logits - ref_logits).abs().max() > 1e-3  # the oracle really steers the pruned model


def _pruned_layout(name: str, pruner: str):
    """The zoo model, the question's inputs and layout, and where the pruner's kept tokens sit in the pruned sequence."""
    model, processor = load(name)
    inputs = _inputs(processor, QUESTION)
    length, vis, query, informative = _layout(model, processor, inputs)
    with mmeff.apply(model, pruner) as handle:
        _greedy(model, inputs)
        kept_index = handle.report()["kept_visual_index"][0]
    k_vis, k_query = _kept_coordinates(length, vis, kept_index, query)
    return model, inputs, vis, query, informative, kept_index, k_vis, k_query


def test_cut_between_saliency_and_enhancement_carries_the_kept_weights():
    """Saliency on the full sequence (layer 4), a FastV cut at layer 5, enhancement on 5-8: each surviving visual
    token keeps the weight it got at the saliency layer (the saliency map read through the kept index)."""
    name, pruner = "tiny-llava", "fastv:keep=48,layer=5"
    model, inputs, vis, query, informative, kept_index, k_vis, k_query = _pruned_layout(name, pruner)
    config = GIFT(alpha=5.0, saliency_layers=(4,), layers=(5, 6, 7, 8))
    oracle = _MappedGiftOracle(type(model.model.language_model.layers[0].self_attn), 4, {5, 6, 7, 8}, 5.0, vis, query,
                               informative, enh_vis=k_vis, enh_query=k_query, carried=kept_index)
    AttentionInterface.register("mmeff_gift_oracle_mapped", oracle.attention)
    ref_model, _ = load(name, attn_implementation="mmeff_gift_oracle_mapped")
    with _apply_to_oracle_model(ref_model, pruner):
        ref_tokens, ref_logits = _greedy(ref_model, inputs)
    with mmeff.apply(model, pruner, config):
        tokens, logits = _greedy(model, inputs)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_saliency_layers_on_both_sides_of_a_cut():
    """Saliency at layers 3 (full sequence) and 5 (after a FastV cut at 4): layer 3's saliency is read at the tokens
    that survive, averaged with layer 5's; enhancement on 6-8 over the kept columns."""
    name, pruner = "tiny-llava", "fastv:keep=48,layer=4"
    model, inputs, vis, query, informative, kept_index, k_vis, k_query = _pruned_layout(name, pruner)
    oracle = _TwoSaliencyOracle(type(model.model.language_model.layers[0].self_attn), _AnyOf({3, 5}), {6, 7, 8}, 5.0,
                                vis, query, informative, enh_vis=k_vis, enh_query=k_query, carried=kept_index)
    AttentionInterface.register("mmeff_gift_oracle_two", oracle.attention)
    ref_model, _ = load(name, attn_implementation="mmeff_gift_oracle_two")
    with _apply_to_oracle_model(ref_model, pruner):
        ref_tokens, ref_logits = _greedy(ref_model, inputs)
    assert len(oracle.layer_s) == 2
    with mmeff.apply(model, pruner, GIFT(alpha=5.0, saliency_layers=(3, 5), layers=(6, 7, 8))):
        tokens, logits = _greedy(model, inputs)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_two_pruners_or_two_mitigators_are_refused():
    model, _ = load("tiny-llava")
    with pytest.raises(mmeff.ConfigError, match="exactly one pruner"):
        mmeff.apply(model, "entropyprune:keep=32", "fastv:keep=32", "vhr")
    with pytest.raises(mmeff.ConfigError, match="at most one mitigator"):
        mmeff.apply(model, "entropyprune:keep=32", "gift", "vhr")
    assert not hasattr(model, "_mmeff_handle")


@pytest.mark.parametrize("mitigator", ["vhr", "gift"])
def test_cli_eval_and_lmms_plugin_run_pruner_plus_mitigator(tmp_path, monkeypatch, mitigator):
    """``mmeff eval --method "entropyprune:keep=64+vhr"`` (and ``+gift``) runs through the lmms-eval plugin."""
    from mmeff.cli import main

    monkeypatch.setenv("MMEFF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run.json"
    rc = main(["eval", "--model", "tiny-llava", "--method", f"entropyprune:keep=64+{mitigator}", "--tasks",
               "mmeff_pope_adversarial", "--limit", "2", "--batch-size", "2", "--out", str(out), "--threads", "1",
               "--quiet", "--verbosity", "ERROR"])
    assert rc == 0
    runs = json.loads(out.read_text())["runs"]
    labels = [r["label"] for r in runs]
    assert labels == ["dense", f"entropyprune:keep=64+{mitigator}"]


def test_bench_latency_is_measured_at_a_fixed_length_and_leaves_the_model_dense():
    from mmeff.eval.halluc_bench import latency
    from mmeff.zoo.world.weak import WeakKnobs, weak_seeds

    model, processor = load("tiny-llava")
    res = latency(model, processor, ["dense", "vhr", "gift"], list(weak_seeds(1)), WeakKnobs(), new_tokens=3)
    assert set(res["methods"]) == {"dense", "vhr", "gift"} and res["new_tokens"] == 3
    assert res["methods"]["vhr"]["median_ratio_to_dense"] > 0
    assert not hasattr(model, "_mmeff_handle")
