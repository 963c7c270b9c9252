"""Paired per-video comparison of two video_prompt_fidelity results."""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from mmeff.eval import compare_prompt_fidelity as cpf


def fake_result(existence: list[list[bool]], colours: list[bool], persists: list[list[bool]]) -> dict:
    """A minimal result: per video one frame's VLM answers, its colour check and its objects' motion."""
    n = len(colours)
    return {
        "prompts": [f"p{i}" for i in range(n)], "seeds": list(range(n)),
        "generated": {
            "vlm": {"0": [{"correct": {f"s{j}": ok for j, ok in enumerate(row)}} for row in existence]},
            "colours": {"0": [{"all_colours_ok": c} for c in colours]},
            "motion": [{"objects": [{"persists": p, "moves_as_named": p} for p in objs]} for objs in persists],
        },
    }


def test_paired_differences_and_t_match_a_hand_computation() -> None:
    old = fake_result([[True, False], [False, False], [True, True]], [False, False, True], [[False], [True], []])
    new = fake_result([[True, True], [True, False], [True, True]], [True, False, True], [[True], [True], []])
    rows = cpf.paired(new, old)
    d = [0.5, 0.5, 0.0]  # per-video existence differences
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    assert rows["shape_existence"]["diff"] == pytest.approx(mean)
    assert rows["shape_existence"]["t"] == pytest.approx(mean / (sd / math.sqrt(3)))
    assert rows["all_colours"]["diff"] == pytest.approx(1 / 3)
    # the third video has no objects: it is left out of persist, not counted as 0
    assert rows["persist"]["n"] == 2 and rows["persist"]["diff"] == pytest.approx(0.5)
    assert rows["persist"]["new"] == pytest.approx(1.0) and rows["persist"]["old"] == pytest.approx(0.5)


def test_results_on_other_prompts_are_refused() -> None:
    a = fake_result([[True]], [True], [[True]])
    b = fake_result([[True]], [True], [[True]])
    b["prompts"] = ["another prompt"]
    with pytest.raises(SystemExit, match="same prompts and seeds"):
        cpf.paired(a, b)


def test_cli_reads_gzipped_results_and_writes_the_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    old = fake_result([[False, False], [True, False]], [False, True], [[False], [True]])
    new = fake_result([[True, False], [True, True]], [True, True], [[True], [True]])
    (tmp_path / "new.json").write_text(json.dumps(new))
    with gzip.open(tmp_path / "old.json.gz", "wt") as f:
        json.dump(old, f)
    cpf.main([str(tmp_path / "new.json"), str(tmp_path / "old.json.gz"), "--out", str(tmp_path / "d.json")])
    assert "shape_existence" in capsys.readouterr().out
    saved = json.loads((tmp_path / "d.json").read_text())["paired"]
    assert saved["shape_existence"]["diff"] == pytest.approx(0.5)
    assert saved["all_colours"]["diff"] == pytest.approx(0.5)
