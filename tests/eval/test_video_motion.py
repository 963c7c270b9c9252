"""The layout-video pixel checks: rendered videos persist and move as their prompts say; reversed or frozen videos
do not."""
from __future__ import annotations

import numpy as np

from mmeff.eval.video_motion import motion_checks, summarise_motion
from mmeff.zoo.world import render
from mmeff.zoo.world.layout import build_layout_scenes, layout_video_scenes


def _video(scene, frames=13):
    per_frame, _ = layout_video_scenes(scene, frames)
    return np.stack([np.asarray(render(f, size=64)) for f in per_frame])


def test_rendered_layout_videos_persist_and_move_as_named():
    scenes = build_layout_scenes("test", 16)
    rows = [motion_checks(_video(s), s) for s in scenes]
    summary = summarise_motion(rows)
    assert summary["object_persists"] == 1.0 and summary["object_moves_as_named"] >= 0.95
    assert rows[0]["frames_checked"] == [0, 6, 12]


def test_reversed_and_frozen_videos_fail_the_motion_check():
    scenes = build_layout_scenes("test", 12)
    reversed_rows = [motion_checks(_video(s)[::-1], s) for s in scenes]
    assert summarise_motion(reversed_rows)["object_moves_as_named"] <= 0.1
    frozen_rows = [motion_checks(np.repeat(_video(s)[:1], 13, axis=0), s) for s in scenes]
    assert summarise_motion(frozen_rows)["object_moves_as_named"] == 0.0


def test_channels_first_float_videos_read_like_uint8():
    scene = build_layout_scenes("test", 1)[0]
    v = _video(scene)
    assert motion_checks(v.transpose(0, 3, 1, 2).astype(np.float32) / 255.0, scene) == motion_checks(v, scene)


def test_an_empty_video_has_no_object():
    scene = build_layout_scenes("test", 1)[0]
    blank = np.zeros((13, 64, 64, 3), dtype=np.uint8)
    r = motion_checks(blank, scene)
    assert not any(o["persists"] or o["moves_as_named"] for o in r["objects"])
