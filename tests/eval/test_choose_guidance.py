"""Choosing a video model's guidance scale from val runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmeff.eval import choose_guidance as cg


def run(cfg: float, existence: float, colours: float, split: str = "val", steps: int = 10) -> dict:
    """A two-video run at ``cfg`` whose pooled summary has these rates (per-video data for the paired table)."""
    videos = [{"correct": {"circle": True, "star": existence > 0.5}}, {"correct": {"circle": True, "star": False}}]
    return {
        "split": split, "prompts": ["a", "b"], "seeds": [1, 2],
        "call_kwargs": {"guidance_scale": cfg, "num_inference_steps": steps},
        "generated": {
            "summary": {"shape_existence_acc": existence, "all_colours_ok": colours,
                        "first_frame_object_in_named_cell": 1.0,
                        "motion": {"object_persists": colours, "object_moves_as_named": colours}},
            "vlm": {"0": videos},
            "colours": {"0": [{"all_colours_ok": colours > 0.5}, {"all_colours_ok": False}]},
            "motion": [{"objects": [{"persists": True, "moves_as_named": True}]}, {"objects": []}],
        },
    }


def test_most_colours_among_scales_near_the_best_existence() -> None:
    runs = [run(1.0, 0.70, 0.90), run(2.0, 0.745, 0.80), run(3.0, 0.75, 0.70), run(5.0, 0.748, 0.60)]
    res = cg.choose(runs, tolerance=0.01)
    # 1.0 has the most colours but loses shape existence; 2.0 is within 0.01 of the best (3.0) and keeps colours
    assert res["chosen_cfg"] == 2.0
    assert set(res["paired_against_chosen"]) == {"1.0", "3.0", "5.0"}
    assert res["per_cfg"]["5.0"]["all_colours"] == pytest.approx(0.60)
    # a wider tolerance admits 1.0
    assert cg.choose(runs, tolerance=0.06)["chosen_cfg"] == 1.0


@pytest.mark.parametrize("runs, message", [
    ([run(2.0, 0.7, 0.8, split="test"), run(3.0, 0.7, 0.8, split="test")], "choose on val"),
    ([run(2.0, 0.7, 0.8), run(2.0, 0.7, 0.9)], "same guidance scale"),
    ([run(2.0, 0.7, 0.8), run(3.0, 0.7, 0.8, steps=20)], "one --steps"),
    ([run(2.0, 0.7, 0.8)], "at least two runs"),
])
def test_bad_sets_of_runs_are_refused(runs: list[dict], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        cg.choose(runs)


def test_cli_writes_the_choice(tmp_path: Path) -> None:
    paths = []
    for r in (run(2.0, 0.74, 0.8), run(5.0, 0.74, 0.6)):
        p = tmp_path / f"c{r['call_kwargs']['guidance_scale']}.json"
        p.write_text(json.dumps(r))
        paths.append(str(p))
    cg.main([*paths, "--out", str(tmp_path / "choice.json")])
    saved = json.loads((tmp_path / "choice.json").read_text())
    assert saved["chosen_cfg"] == 2.0 and saved["runs"] == paths
