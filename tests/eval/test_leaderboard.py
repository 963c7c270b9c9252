"""The pruner leaderboard: method discovery, layer choice, confidence intervals, goals (no model runs)."""
from __future__ import annotations

import dataclasses
import random
from typing import ClassVar

import pytest

from mmeff.core import registry
from mmeff.core.registry import get_method
from mmeff.eval import leaderboard as lb
from mmeff.pruners.base import PrunerConfig


def test_every_registered_pruner_is_on_the_board(monkeypatch):
    assert {"random", "fastv", "entropyprune", "zooprune"} <= set(lb.leaderboard_methods())
    assert not any(n.startswith("test_") for n in lb.leaderboard_methods())

    @dataclasses.dataclass(frozen=True)
    class LaterPruner(PrunerConfig):  # e.g. AdaptInfer, registered by a later module
        name: ClassVar[str] = "adaptinfer_stand_in"

    monkeypatch.setitem(registry._METHODS, LaterPruner.name, LaterPruner)
    assert "adaptinfer_stand_in" in lb.leaderboard_methods()


def test_in_llm_layer_falls_back_only_when_the_budget_cannot_be_met():
    # tiny-qwen2-vl: 8 layers, 144 tokens. FastV's default K=2 cannot average 32 (needs >= 36); K=1 can.
    assert lb.method_spec("fastv", "qwen2_vl", 8, 144, (128, 64, 32)) == "fastv:layer=1"
    assert lb.method_spec("fastv", "llava", 12, 576, (192, 128, 96)) == "fastv"  # K=2 meets 96 on 12 layers
    assert lb.method_spec("fastv", "llava", 12, 576, (192, 128, 64)) == "fastv:layer=1"  # but not 64
    assert lb.method_spec("zooprune", "qwen2_vl", 8, 144, (128, 64, 32)) == "zooprune"  # pre-LLM: no layer
    # multi-cut methods own their schedule: no layer= (AdaptInfer refuses it), and the spec builds
    for name in ("adaptinfer", "vflowopt"):
        spec = lb.method_spec(name, "llava", 12, 576, (192, 128, 64))
        assert spec == name
        get_method(name)(budget=64)


def test_wilson_and_paired_bootstrap():
    lo, hi = lb.wilson(50, 100)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.19, abs=0.01)
    assert lb.wilson(0, 10)[0] == 0.0 and lb.wilson(10, 10)[1] == 1.0
    rng = random.Random(0)
    dense = {"a": [rng.random() < 0.9 for _ in range(200)], "b": [True] * 200}
    same = lb.paired_retention(dense, dense, iters=200)
    assert same["mean"] == 1.0 and same["mean_ci95"] == (1.0, 1.0)  # paired: identical answers, no spread
    worse = {"a": [x and i % 2 == 0 for i, x in enumerate(dense["a"])], "b": [i % 4 != 0 for i in range(200)]}
    res = lb.paired_retention(dense, worse, iters=300)
    expect_a = sum(worse["a"]) / sum(dense["a"])
    assert res["tasks"]["a"]["retention"] == pytest.approx(expect_a)
    assert res["mean"] == pytest.approx((expect_a + 0.75) / 2)
    lo, hi = res["mean_ci95"]
    assert lo < res["mean"] < hi and hi - lo < 0.15


def test_correct_uses_the_task_rules():
    assert lb.correct("mmeff_pope_random", {"target": "yes", "response": "Yes."})
    assert not lb.correct("mmeff_pope_random", {"target": "no", "response": "yes"})
    assert lb.correct("mmeff_count", {"target": "3", "response": "three"})
    assert not lb.correct("mmeff_count", {"target": "3", "response": "6,6,6"})


def test_goals():
    def entry(means):
        return {"budgets": [192, 128, 64], "mean": means}
    res = {"m": {"budgets": [192, 128, 64], "methods": {"random": entry([0.9, 0.85, 0.7]),
                                                        "a": entry([0.95, 0.9, 0.97]), "b": entry([0.88, 0.8, 0.6])}}}
    g = lb.goals(res)["m"]
    assert g["best_at_64"] == "a" and g["goal_best_at_64_reached"]
    assert g["above_random_at_largest"] == {"a": True, "b": False} and not g["goal_all_above_random_reached"]
