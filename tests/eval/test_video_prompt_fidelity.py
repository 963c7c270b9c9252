"""Video prompt fidelity: the world's own layout videos meet every target, frames of the wrong scene do not, and
the CLI scores a saved pipeline end to end (generated, renders, VAE round trip, grid)."""
from __future__ import annotations

import json

import pytest

from mmeff.eval.video_prompt_fidelity import checked_frames, reference_videos, score
from mmeff.zoo.world import split_seeds


def test_the_worlds_layout_videos_meet_the_targets_and_the_vlm_sees_their_shapes():
    from mmeff.zoo.load import load

    seeds = split_seeds("test", 4)
    videos, per_frame = reference_videos(seeds, "layout", 13, 64)
    out = score(videos, per_frame, "layout", load("tiny-qwen2-vl"))
    s = out["summary"]
    assert s["frames_checked"] == checked_frames(13) == [0, 6, 12]
    assert s["all_colours_ok"] == 1.0 and s["first_frame_object_in_named_cell"] == 1.0
    assert s["motion"]["object_persists"] == 1.0 and s["motion"]["object_moves_as_named"] >= 0.9
    assert s["shape_existence_acc"] >= 0.85 and s["yes_rate_absent"] <= 0.15
    assert set(out["vlm"]) == {"0", "6", "12"} and len(out["vlm"]["0"]) == 4


def test_videos_of_other_scenes_fail_positions_and_motion():
    seeds = split_seeds("test", 8)
    videos, per_frame = reference_videos(seeds, "layout", 13, 64)
    shuffled = videos[1:] + videos[:1]  # every prompt scored against another scene's video
    s = score(shuffled, per_frame, "layout", None)["summary"]
    assert s["first_frame_object_in_named_cell"] <= 0.5 and s["motion"]["object_persists"] <= 0.5
    assert s["all_colours_ok"] < 0.8


def test_the_cli_scores_a_saved_pipeline_and_writes_the_grid(tmp_path):
    from mmeff.eval.video_prompt_fidelity import main
    from mmeff.zoo.load_video import video_pipeline_path

    out = tmp_path / "vpf.json"
    main(["--model", str(video_pipeline_path("tiny-wan")), "--n", "2", "--steps", "2", "--vlm", "none",
          "--split", "val", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["format"] == "mmeff.video_prompt_fidelity/1" and doc["split"] == "val"
    assert doc["seeds"] == list(split_seeds("val", 2))
    for name in ("generated", "renders", "vae_round_trip"):
        assert set(doc[name]["summary"]["all_colours_ok_by_frame"]) == {"0", "6", "12"}
    assert doc["renders"]["summary"]["all_colours_ok"] == 1.0
    assert (tmp_path / "vpf_grid.png").stat().st_size > 0
    assert doc["pipe_training"]["diffusion_steps"] > 0


def test_the_cli_refuses_an_empty_run(capsys):
    from mmeff.eval.video_prompt_fidelity import main

    with pytest.raises(SystemExit) as e:
        main(["--n", "0"])
    assert e.value.code != 0 and "--n must be at least 1" in capsys.readouterr().err
