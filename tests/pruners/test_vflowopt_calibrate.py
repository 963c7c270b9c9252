"""`mmeff calibrate vflowopt` end to end on tiny-llava: result JSON, resume, and the method reading it."""
from __future__ import annotations

import json

import pytest
import torch

from mmeff.cli import main
from mmeff.core.errors import BudgetError
from mmeff.pruners import VFlowOpt
from mmeff.pruners.vflowopt_schedule import average_budget, solve_last_ratio, solve_ratio_v
from mmeff.calibrate.vflowopt_bo import feasible_ratios


def test_calibrate_writes_json_resumes_and_the_method_reads_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    out = tmp_path / "vflowopt.json"
    args = ["calibrate", "vflowopt", "--model", "tiny-llava", "--budget", "64", "--samples", "2",
            "--batch-size", "2", "--out", str(out)]
    assert main(args + ["--trials", "2"]) == 0
    first = json.loads(out.read_text())
    assert first["trials"] == 2 and first["samples"] == 2 and first["n_visual"] == 576
    assert first["budget_fraction"] == pytest.approx(64 / 576)
    assert -1.0 <= first["objective_mean_cosine"] <= 1.0
    assert (tmp_path / "vflowopt.db").is_file()
    # resume: the study already holds 2 trials, one more is run
    assert main(args + ["--trials", "3"]) == 0
    second = json.loads(out.read_text())
    assert second["trials"] == 3 and second["objective_mean_cosine"] >= first["objective_mean_cosine"]
    p = second["params"]
    assert second["llm_layers"] == [4, 8]  # tiny-llava: 12 LLM layers, cuts at L/3 and 2L/3
    assert average_budget(576, p["ratio_v"], (p["ratio_1"], p["ratio_2"]), (4, 8), 12) == pytest.approx(64)
    got = VFlowOpt(budget=64, calibration=str(out)).params(576, 12)
    assert (got.vit_t, got.vit_m, got.alpha_v, got.ratio_v) == pytest.approx(
        (p["vit_t"], p["vit_m"], p["alpha_v"], p["ratio_v"]))
    assert got.llm_layers == (4, 8) and got.llm_ratios == pytest.approx((p["ratio_1"], p["ratio_2"]))
    # at another budget the calibrated LLM ratios stay and ratio_v is solved
    other = VFlowOpt(budget=128, calibration=str(out)).params(576, 12)
    assert other.llm_ratios == pytest.approx((p["ratio_1"], p["ratio_2"]))
    assert average_budget(576, other.ratio_v, other.llm_ratios, (4, 8), 12) == pytest.approx(128)
    assert got.source == str(out)
    assert main(["calibrate", "vflowopt", "--model", "tiny-llava", "--out", str(tmp_path / "x.json")]) == 2
    assert "--budget" in capsys.readouterr().err


def test_budget_arithmetic_round_trips():
    layers, n_layers, n = (4, 8), 12, 576
    r2 = solve_last_ratio(64, n, 0.2, (0.5,), layers, n_layers)
    assert 0 < r2 < 1 and average_budget(n, 0.2, (0.5, r2), layers, n_layers) == pytest.approx(64)
    rv = solve_ratio_v(64, n, (0.9833, 0.8773), layers, n_layers)
    assert average_budget(n, rv, (0.9833, 0.8773), layers, n_layers) == pytest.approx(64)
    with pytest.raises(BudgetError, match="cannot be met"):
        solve_last_ratio(64, n, 0.9, (1.0,), layers, n_layers)
    for u in (0.0, 0.37, 1.0):  # the BO's unit square always maps onto schedules the budget can meet
        rv, r1 = feasible_ratios(u, 1 - u, 64 / n, layers, n_layers)
        r2 = solve_last_ratio(64, n, rv, (r1,), layers, n_layers)
        assert 0 < r1 <= 1 and 0 <= r2 <= 1
