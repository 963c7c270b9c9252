"""AdaptInfer: released schedules, budget conventions, and an oracle for the scoring rule on the zoo models."""
from __future__ import annotations

import pytest
import torch

import mmeff
from mmeff.pruners import AdaptInfer
from mmeff.pruners import adaptinfer_math as am


def test_released_llava_schedule_and_both_budget_conventions():
    cfg = AdaptInfer(budget=64, budget_convention="equal_token")
    cuts = cfg.plan_layers("llava", 32)
    assert cuts == (2, 11, 21)
    assert cfg.keep_schedule(576, 32, cuts, family="llava") == [133, 27, 3]
    counts = am.per_layer_counts(576, 32, cuts, [133, 27, 3])
    assert am.average_budget(counts, "equal_token") == pytest.approx(2079 / 32)  # the paper's count, ~64
    assert am.average_budget(counts, "layer_average") == pytest.approx(2652 / 32)  # what the layers process, ~83
    for budget, row in am.LLAVA_KEEPS.items():
        assert AdaptInfer(budget=budget, budget_convention="equal_token").keep_schedule(
            576, 32, cuts, family="llava") == list(row)
    # mmeff's budget: the same shape, scaled so that the layer average is the budget
    keeps = AdaptInfer(budget=64).keep_schedule(576, 32, cuts, family="llava")
    assert am.average_budget(am.per_layer_counts(576, 32, cuts, keeps), "layer_average") <= 64
    assert keeps[0] < 133 and keeps == sorted(keeps, reverse=True)


def test_qwen_ratios_and_depth_scaling():
    cfg = AdaptInfer(ratios=(0.17, 0.6, 0.3))
    assert cfg.plan_layers("qwen2_vl", 28) == (1, 10, 20)
    assert cfg.keep_schedule(1000, 28, (1, 10, 20), family="qwen2_vl") == [170, 102, 30]
    assert AdaptInfer(budget=64).plan_layers("llava", 12) == (1, 5, 9)     # [1, 10, 20] of 32 -> [0, 4, 8] of 12
    assert AdaptInfer(budget=64).plan_layers("qwen2_vl", 8) == (1, 4, 6)  # (0, 9, 19) of 28 -> (0, 3, 5) of 8
    assert am.scale_layers((1, 10, 20), 32, 4) == (0, 1, 2)
    with pytest.raises(mmeff.BudgetError, match="at least 4 layers"):
        am.scale_layers((1, 10, 20), 32, 3)


def test_score_is_the_text_prior_weighted_text_to_vision_attention():
    torch.manual_seed(0)
    attn = torch.rand(2, 3, 9).softmax(-1)                  # 2 heads, 3 text rows over 9 tokens
    text, vis = torch.tensor([6, 7, 8]), torch.tensor([1, 2, 3, 4, 5])
    score = am.text_prior_scores(attn, text, vis)
    expected = torch.zeros(5)
    for h in range(2):
        t2t = attn[h][:, text]
        for j in range(3):
            w = sum(t2t[i, j] + t2t[j, i] for i in range(3)) - t2t[j, j]
            expected += w * attn[h, j, vis]
    torch.testing.assert_close(score, expected)
