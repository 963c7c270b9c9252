"""t2i_fidelity's two judges: the pixel colour check (renders pass, a blank canvas or a wrong background fails)
and the zoo VLM's shape-existence answers on renders (right on the world's own images)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmeff.eval.t2i_fidelity import (
    colour_checks,
    existence_questions,
    min_colour_pixels,
    per_shape_rates,
    summarise,
)
from mmeff.zoo.world import BACKGROUNDS, build_scenes, render


def test_renders_pass_the_colour_check_at_64px():
    scenes = build_scenes("test", 12)
    rows = [colour_checks(render(s, size=64), s) for s in scenes]
    assert all(r["background_ok"] for r in rows)
    assert np.mean([r["all_colours_ok"] for r in rows]) >= 11 / 12


def test_blank_canvas_has_the_background_but_no_object_colour():
    scene = build_scenes("test", 1)[0]
    blank = np.zeros((64, 64, 3), dtype=np.uint8) + np.array(BACKGROUNDS[scene.background], dtype=np.uint8)
    r = colour_checks(blank, scene)
    assert r["background_ok"] and not any(r["colours"].values()) and not r["all_colours_ok"]
    other = next(b for b in BACKGROUNDS if b != scene.background)
    wrong = np.asarray(render(scene, size=64)).copy()
    wrong[:3], wrong[-3:], wrong[:, :3], wrong[:, -3:] = [np.array(BACKGROUNDS[other], dtype=np.uint8)] * 4
    assert not colour_checks(wrong, scene)["background_ok"]


def test_float_images_in_unit_range_are_read_like_uint8():
    scene = build_scenes("test", 2)[1]
    im = np.asarray(render(scene, size=64))
    assert colour_checks(im.astype(np.float32) / 255.0, scene) == colour_checks(im, scene)
    assert min_colour_pixels(64) > min_colour_pixels(32) >= 3


def test_existence_questions_cover_all_shapes_with_the_scene_answers():
    scene = build_scenes("test", 1)[0]
    qs = existence_questions(scene)
    assert len(qs) == 6 and {a for _, _, a in qs} <= {"yes", "no"}
    assert {s for s, _, a in qs if a == "yes"} == scene.shapes()


def test_per_shape_rates_expose_a_generator_that_draws_every_shape_as_a_circle():
    """A judge that answers "circle" to everything: circle recall 1 and false-yes 1, every other shape recall 0."""
    scenes = build_scenes("test", 12)
    rows = [{"answers": {s: ("yes" if s == "circle" else "no") for s, _, _ in existence_questions(sc)},
             "correct": {}, "present": sorted(sc.shapes())} for sc in scenes]
    rates = per_shape_rates(rows)
    drawn = {s for sc in scenes for s in sc.shapes()}
    assert len(drawn) >= 4 and all(r["n_absent"] > 0 for r in rates.values())  # every rate below is defined
    assert set(rates) == {s for s, _, _ in existence_questions(scenes[0])}
    for shape, r in rates.items():
        assert r["n_drawn"] == sum(shape in sc.shapes() for sc in scenes)
        assert r["n_drawn"] + r["n_absent"] == len(scenes)
        if shape == "circle":
            assert r["false_yes"] == 1.0 and r["recall"] == 1.0
        elif shape in drawn:
            assert r["recall"] == 0.0 and r["false_yes"] == 0.0
    summary = summarise(rows, [colour_checks(render(sc, size=64), sc) for sc in scenes])
    assert json.dumps(summary["per_shape"]) == json.dumps(rates)  # NaN-safe equality (a shape never drawn)
    assert "per_shape" not in summarise([], [colour_checks(render(scenes[0], size=64), scenes[0])])


@pytest.mark.parametrize("family", ["world", "layout"])
def test_zoo_vlm_answers_existence_on_renders(family):
    """Right on the world's own images, and on layout scenes too (the VLM was trained on world scenes only)."""
    from mmeff.eval.t2i_fidelity import vlm_existence
    from mmeff.zoo.load import load
    from mmeff.zoo.prompt_family import held_out_scenes

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, processor = load("tiny-qwen2-vl")
        scenes = held_out_scenes(family, "test", 3)
        rows = vlm_existence(model, processor, [render(s, size=64) for s in scenes], scenes)
    finally:
        torch.set_num_threads(before)
    summary = summarise(rows, [colour_checks(render(s, size=64), s) for s in scenes])
    assert summary["n_questions"] == 18 and summary["shape_existence_acc"] >= 15 / 18
    assert summary["yes_rate_absent"] < 0.5 < summary["yes_rate_present"]


def test_evaluate_scores_generated_renders_and_the_vae_round_trip_in_the_pipelines_family():
    from mmeff.eval.t2i_fidelity import evaluate, vae_round_trip
    from mmeff.zoo.load_pipeline import load_pipeline
    from mmeff.zoo.prompt_family import held_out_scenes, pipeline_family, prompt_of

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = load_pipeline("tiny-sd3")
        family = pipeline_family(pipe)
        scenes = held_out_scenes(family, "test", 2)
        out = evaluate(pipe, None, scenes, steps=1, batch_size=2)
        trips = vae_round_trip(pipe, [render(s, size=64) for s in scenes])
    finally:
        torch.set_num_threads(before)
    assert out["prompt_family"] == family and out["prompts"] == [prompt_of(family, s) for s in scenes]
    assert set(out) >= {"generated", "renders", "vae_round_trip"}
    assert out["renders"]["summary"]["all_colours_ok"] == 1.0
    assert trips[0].shape == (64, 64, 3) and 0.0 <= trips[0].min() and trips[0].max() <= 1.0
    # the round trip is close to the render it came from (a trained VAE), far from a blank canvas
    err = np.abs(trips[0] - np.asarray(render(scenes[0], size=64)) / 255.0).mean()
    assert err < 0.05
    if family == "layout":
        assert "all_positions_ok" in out["renders"]["summary"] and out["renders"]["summary"]["all_positions_ok"] == 1.0
