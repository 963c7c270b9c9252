"""Layout scenes (the diffusion test bed's prompts): objects in distinct cells of a 3x3 grid, prompts that name
every cell, videos that move in the named directions; the prompt family a saved pipeline records; the pixel
position check of t2i_fidelity."""
from __future__ import annotations

import pytest

from mmeff.zoo.world import SIZES, render, split_seeds
from mmeff.zoo.world.layout import (
    CELL_PHRASES,
    DIRECTIONS,
    GRID,
    SPEED,
    build_layout_scenes,
    cell_of,
    generate_layout_scene,
    layout_video_scenes,
    make_layout_prompt,
    make_layout_video_prompt,
)


def test_layout_scenes_are_deterministic_with_distinct_cells_and_no_labels():
    seeds = list(split_seeds("train", 300))
    counts = set()
    for s in seeds:
        sc = generate_layout_scene(s)
        assert sc == generate_layout_scene(s)
        cells = [cell_of(o) for o in sc.objects]
        assert len(set(cells)) == len(cells) and 1 <= len(cells) <= 3
        counts.add(len(cells))
        for o in sc.objects:
            r = SIZES[o.size]
            assert o.word is None and r <= o.x <= 1 - r and r <= o.y <= 1 - r
            cx, cy = (cell_of(o)[0] + 0.5) / GRID, (cell_of(o)[1] + 0.5) / GRID
            assert abs(o.x - cx) <= 0.02 + 1e-4 and abs(o.y - cy) <= 0.02 + 1e-4  # positions are rounded to 4 places
    assert counts == {1, 2, 3}
    assert generate_layout_scene(1) != generate_layout_scene(2)


def test_layout_prompt_names_every_object_with_its_cell_in_reading_order():
    sc = next(s for s in build_layout_scenes("test", 50) if len(s.objects) == 3)
    prompt = make_layout_prompt(sc)
    assert prompt.endswith(f"on a {sc.background} background")
    positions = []
    for o in sc.objects:
        phrase = f"{o.colour} {o.shape} {CELL_PHRASES[cell_of(o)]}"
        assert phrase in prompt
        positions.append((prompt.index(phrase), cell_of(o)[1], cell_of(o)[0]))
    assert [p[1:] for p in sorted(positions)] == sorted(p[1:] for p in positions)  # top row first, then left


def test_layout_prompts_fit_the_tiny_sd3_text_length():
    from mmeff.zoo.train_sd3 import (
        TEXT_LEN,
        clip_tokenizer,
        recipe_vocabulary,
        t5_tokenizer,
    )

    words = recipe_vocabulary("layout64")
    clip, t5 = clip_tokenizer(words=words), t5_tokenizer(words)
    prompts = [make_layout_prompt(s) for s in build_layout_scenes("train", 400)]
    longest = max(prompts, key=len)
    assert len(clip(longest).input_ids) <= TEXT_LEN and len(t5(longest).input_ids) <= TEXT_LEN
    for w in ("top", "left", "centre", "bottom", "right"):  # one token each, no character fallback
        assert len(clip(w, add_special_tokens=False).input_ids) == 1
    n_words = len(longest.replace(",", " ,").split())
    assert len(clip(longest).input_ids) == n_words + 2 and len(t5(longest).input_ids) == n_words + 1  # 1 token a word


def test_layout_videos_move_in_the_named_directions_and_stay_on_the_canvas():
    frames = 13
    for sc in build_layout_scenes("val", 60):
        per_frame, dirs = layout_video_scenes(sc, frames)
        prompt = make_layout_video_prompt(sc, frames)
        assert len(per_frame) == frames
        for i, o in enumerate(sc.objects):
            assert f"{o.shape} {CELL_PHRASES[cell_of(o)]} moving {dirs[i]}" in prompt
            first, last = per_frame[0].objects[i], per_frame[-1].objects[i]
            dx, dy = DIRECTIONS[dirs[i]]
            assert last.x - first.x == pytest.approx(dx * SPEED * (frames - 1), abs=1e-3)
            assert last.y - first.y == pytest.approx(dy * SPEED * (frames - 1), abs=1e-3)
            r = SIZES[o.size]
            assert all(r - 1e-9 <= f.objects[i].x <= 1 - r + 1e-9 and r - 1e-9 <= f.objects[i].y <= 1 - r + 1e-9
                       for f in per_frame)


def test_renders_pass_the_position_check_and_swapped_objects_fail_it():
    from mmeff.eval.t2i_fidelity import position_checks

    scenes = [s for s in build_layout_scenes("test", 40) if len(s.objects) >= 2][:12]
    assert all(position_checks(render(s, size=64), s)["all_positions_ok"] for s in scenes)
    swapped = 0
    for s in scenes:
        a, b = s.objects[0], s.objects[1]
        if a.colour == b.colour:
            continue
        moved = s.with_objects([a.__class__(a.shape, a.colour, a.size, b.x, b.y),
                                b.__class__(b.shape, b.colour, b.size, a.x, a.y), *s.objects[2:]])
        assert not position_checks(render(moved, size=64), s)["all_positions_ok"]
        swapped += 1
    assert swapped >= 5


def test_prompt_family_is_read_from_the_saved_training_json(tmp_path):
    import json

    from mmeff.core.errors import ConfigError
    from mmeff.zoo.prompt_family import folder_family, held_out_scenes, prompt_of

    assert folder_family(tmp_path) == "world"  # no training.json: a hub / random pipeline
    (tmp_path / "training.json").write_text(json.dumps({"recipe_config": {"data": "layout"}}))
    assert folder_family(tmp_path) == "layout"
    (tmp_path / "training.json").write_text(json.dumps({"prompt_family": "world"}))
    assert folder_family(tmp_path) == "world"
    scene = held_out_scenes("layout", "test", 1)[0]
    assert prompt_of("layout", scene) == make_layout_prompt(scene) and "background" in prompt_of("world", scene)
    with pytest.raises(ConfigError, match="prompt family"):
        prompt_of("poems", scene)


def test_video_prompts_name_directions_only_for_layout_scenes():
    from mmeff.zoo.prompt_family import held_out_scenes, prompt_of, video_prompt_of

    layout = held_out_scenes("layout", "test", 1)[0]
    assert video_prompt_of("layout", layout, 13) == make_layout_video_prompt(layout, 13) and "moving" in \
        video_prompt_of("layout", layout, 13)
    world = held_out_scenes("world", "test", 1)[0]
    assert video_prompt_of("world", world) == prompt_of("world", world)
