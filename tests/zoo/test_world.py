"""Tests of the shapes world: determinism, answers re-derived independently from the
scene, bias rates, CHAIR, rendering and video motion, dataset splits."""

from __future__ import annotations

import io
import itertools
import random
import re
import time
from collections import Counter

import pytest
from PIL import Image

from mmeff.zoo.world import (
    BACKGROUNDS,
    BIASES,
    COLOURS,
    POPULAR,
    SHAPES,
    SIZES,
    SPLITS,
    WORDS,
    Obj,
    Scene,
    build_split,
    chair_scores,
    generate_scene,
    grounding_drill,
    make_caption,
    make_prompt,
    make_questions,
    parse_mentions,
    read_jsonl,
    render,
    render_video,
    save_images,
    scene_of,
    split_seeds,
    video_scenes,
    write_jsonl,
)
from mmeff.zoo.world.chair import COLOUR_SYNONYMS, SHAPE_SYNONYMS

N_SCENES = 500


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return [generate_scene(s) for s in range(N_SCENES)]


@pytest.fixture(scope="module")
def many_scenes() -> list[Scene]:
    return [generate_scene(s) for s in range(10_000, 13_000)]


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------- determinism


def test_same_seed_same_scene_and_bytes() -> None:
    for seed in (0, 1, 12345):
        a, b = generate_scene(seed), generate_scene(seed)
        assert a == b
        assert render(a).tobytes() == render(b).tobytes()
        assert _png(render(a, 64)) == _png(render(b, 64))
    random.seed(999)  # the global RNG must not matter
    assert generate_scene(3) == generate_scene(3)


def test_different_seeds_differ() -> None:
    imgs = {render(generate_scene(s)).tobytes() for s in range(20)}
    assert len(imgs) == 20
    assert len({generate_scene(s).objects for s in range(20)}) == 20


def test_scene_is_valid(scenes: list[Scene]) -> None:
    for sc in scenes:
        assert 1 <= len(sc.objects) <= 6
        assert sc.background in BACKGROUNDS and (sc.width, sc.height) == (336, 336)
        assert sum(o.word is not None for o in sc.objects) <= 1
        boxes = [o.bbox() for o in sc.objects]
        for o, (x0, y0, x1, y1) in zip(sc.objects, boxes):
            assert o.shape in SHAPES and o.colour in COLOURS and o.size in SIZES
            assert 0 <= x0 and x1 <= 1 and 0 <= y0 and y1 <= 1
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (
                    sc.seed
                )
        assert Scene.from_dict(sc.to_dict()) == sc


def test_vocabulary_words_are_not_objects() -> None:
    lexicon = set(SHAPE_SYNONYMS) | set(COLOUR_SYNONYMS) | set(SIZES)
    assert not lexicon & set(WORDS)
    assert len(SHAPES) >= 6 and len(COLOURS) >= 8 and len(SIZES) >= 2
    rgbs = list(COLOURS.values()) + list(BACKGROUNDS.values())
    for i in range(len(rgbs)):
        for j in range(i + 1, len(rgbs)):
            assert sum(abs(a - b) for a, b in zip(rgbs[i], rgbs[j])) > 60


# ----------------------------------------------------------------------- biases


def test_biases_hold(many_scenes: list[Scene]) -> None:
    kinds = Counter(b.kind for b in BIASES)
    assert kinds["cooccur"] >= 3
    for b in BIASES:
        if b.kind == "cooccur":
            hits = [
                any(o.shape == b.then for o in sc.objects)
                for sc in many_scenes
                if any(o.shape == b.given[0] for o in sc.objects)
            ]
            base = [
                any(o.shape == b.then for o in sc.objects)
                for sc in many_scenes
                if not any(o.shape == b.given[0] for o in sc.objects)
            ]
            assert len(hits) > 300
            assert sum(base) / len(base) < b.rate - 0.3  # it is a bias, not a constant
        elif b.kind == "colour":
            hits = [
                o.colour == b.then
                for sc in many_scenes
                for o in sc.objects
                if o.shape == b.given[0]
            ]
        else:
            hits = [
                o.size == b.then
                for sc in many_scenes
                for o in sc.objects
                if (o.colour, o.shape) == b.given
            ]
        assert len(hits) > 100, b
        assert abs(sum(hits) / len(hits) - b.rate) < 0.07, (b, sum(hits) / len(hits))


def test_popular_order_matches_frequencies(many_scenes: list[Scene]) -> None:
    freq = Counter(s for sc in many_scenes for s in {o.shape for o in sc.objects})
    assert list(POPULAR) == sorted(SHAPES, key=lambda s: -freq[s])


# ----------------------------------------------------------------------- questions

PLURAL_TO_SHAPE = {
    "circles": "circle",
    "squares": "square",
    "triangles": "triangle",
    "stars": "star",
    "crosses": "cross",
    "diamonds": "diamond",
}


def _resolve(sc: Scene, phrase: str) -> list[int]:
    """Indices of the objects a referring phrase like 'small red circle' matches."""
    words = phrase.split()
    assert words[-1] in SHAPES, phrase
    out = []
    for i, o in enumerate(sc.objects):
        if o.shape != words[-1]:
            continue
        if all(w == o.colour or w == o.size for w in words[:-1]):
            out.append(i)
    return out


def _check_qa(sc: Scene, qa) -> None:
    q, a, fam = qa.question, qa.answer, qa.family
    if fam == "existence":
        shape = re.fullmatch(r"Is there a (\w+) in the image\?", q).group(1)
        present = False
        for o in sc.objects:
            if o.shape == shape:
                present = True
        assert a == ("yes" if present else "no")
        if a == "no":
            setting = qa.meta["pope"]
            absent = [s for s in SHAPES if all(o.shape != s for o in sc.objects)]
            if setting == "popular":
                assert shape == next(s for s in POPULAR if s in absent)
            elif setting == "adversarial":
                partners = {
                    b.then
                    for b in BIASES
                    if b.kind == "cooccur"
                    and any(o.shape == b.given[0] for o in sc.objects)
                }
                assert shape in partners
    elif fam in ("colour", "size"):
        phrase = re.fullmatch(rf"What {fam} is the ([\w ]+)\?", q).group(1)
        idx = _resolve(sc, phrase)
        assert len(idx) == 1, (q, sc)
        assert a == getattr(sc.objects[idx[0]], fam)
        assert not any(
            w in (COLOURS if fam == "colour" else SIZES) for w in phrase.split()
        )
    elif fam == "count":
        m = re.fullmatch(r"How many (\w+) are there\?", q)
        n = 0
        for o in sc.objects:
            if m.group(1) == "objects" or o.shape == PLURAL_TO_SHAPE[m.group(1)]:
                n += 1
        assert a == str(n)
    elif fam == "position":
        m = re.fullmatch(
            r"Is the ([\w ]+?) to the left (or to the right )?of the ([\w ]+)\?", q
        ) or re.fullmatch(r"Is the ([\w ]+?) above (or below )?the ([\w ]+)\?", q)
        ia, ib = _resolve(sc, m.group(1)), _resolve(sc, m.group(3))
        assert len(ia) == 1 and len(ib) == 1, q
        oa, ob = sc.objects[ia[0]], sc.objects[ib[0]]
        if "left" in q:
            assert abs(oa.x - ob.x) >= 0.1
            left = oa.x < ob.x
            assert a == (
                ("left" if left else "right")
                if m.group(2)
                else ("yes" if left else "no")
            )
        else:
            assert abs(oa.y - ob.y) >= 0.1
            above = oa.y < ob.y
            assert a == (
                ("above" if above else "below")
                if m.group(2)
                else ("yes" if above else "no")
            )
    elif fam == "reading":
        words = [o.word for o in sc.objects if o.word is not None]
        assert words == [a]
    elif fam == "caption":
        assert a == make_caption(sc)
        res = chair_scores([a], [sc])
        assert res["chair_i"] == 0 and res["recall"] == 1
    else:
        raise AssertionError(fam)


def test_answers_correct_by_construction(scenes: list[Scene]) -> None:
    fams: Counter = Counter()
    settings: Counter = Counter()
    for sc in scenes:
        qas = make_questions(sc, random.Random(sc.seed))
        for qa in qas:
            _check_qa(sc, qa)
            fams[qa.family] += 1
            if qa.family == "existence":
                settings[(qa.meta["pope"], qa.answer)] += 1
        has_word = any(o.word for o in sc.objects)
        assert any(qa.family == "reading" for qa in qas) == has_word
    assert set(fams) == {
        "existence",
        "colour",
        "size",
        "count",
        "position",
        "reading",
        "caption",
    }
    for setting in ("random", "popular", "adversarial"):
        assert settings[(setting, "yes")] == settings[(setting, "no")] > 0


def test_grounding_drill_asks_every_shape_correctly(scenes: list[Scene]) -> None:
    for sc in scenes:
        qas = grounding_drill(sc)
        for qa in qas:
            _check_qa(sc, qa)
        exist = {qa.meta["shape"]: qa.answer for qa in qas if qa.family == "existence"}
        assert exist == {s: ("yes" if s in sc.shapes() else "no") for s in SHAPES}
        counts = {qa.meta["shape"]: int(qa.answer) for qa in qas if qa.family == "count"}
        assert counts == {s: sc.count(s) for s in sc.shapes()} and all(c > 0 for c in counts.values())
        with_positions = grounding_drill(sc, random.Random(sc.seed), positions=8)
        extra = with_positions[len(qas):]
        assert with_positions[: len(qas)] == qas and len(extra) <= 8
        assert all(qa.family == "position" for qa in extra)
        for qa in extra:
            _check_qa(sc, qa)
    assert any(len(grounding_drill(sc, random.Random(0), positions=8)) > len(grounding_drill(sc)) for sc in scenes)
    with pytest.raises(ValueError, match="rng"):
        grounding_drill(scenes[0], positions=2)


def test_colour_only_when_unambiguous() -> None:
    sc = Scene(
        (
            Obj("circle", "red", "small", 0.2, 0.2),
            Obj("circle", "blue", "small", 0.8, 0.8),
            Obj("star", "yellow", "large", 0.5, 0.5),
        ),
        "white",
        0,
    )
    qs = [q for q in make_questions(sc, 0, per_family=5) if q.family == "colour"]
    assert [q.question for q in qs] == ["What colour is the star?"]
    assert qs[0].answer == "yellow" and qs[0].meta["biased"]


def test_questions_deterministic_and_family_filter() -> None:
    sc = generate_scene(42)
    a = make_questions(sc, random.Random(1))
    assert a == make_questions(sc, random.Random(1))
    only = make_questions(sc, random.Random(1), families=["count"])
    assert only == [q for q in a if q.family == "count"]
    with pytest.raises(ValueError):
        make_questions(sc, 0, families=["nope"])


def test_caption_and_prompt() -> None:
    sc = Scene(
        (
            Obj("square", "red", "large", 0.2, 0.5),
            Obj("circle", "blue", "small", 0.5, 0.5),
            Obj("star", "green", "medium", 0.8, 0.5, "cat"),
            Obj("cross", "orange", "medium", 0.5, 0.2),
        ),
        "gray",
        0,
    )
    # left to right; equal x: top first
    assert make_caption(sc) == (
        "a large red square, an orange cross, a small blue circle "
        'and a green star labelled "cat"'
    )
    assert make_prompt(sc) == (
        "a large red square, an orange cross, a small blue circle "
        "and a green star on a gray background"
    )


# ----------------------------------------------------------------------- CHAIR


def test_chair() -> None:
    sc = Scene(
        (
            Obj("square", "red", "large", 0.2, 0.5),
            Obj("circle", "blue", "small", 0.5, 0.5),
            Obj("circle", "blue", "small", 0.5, 0.8),
            Obj("star", "green", "medium", 0.8, 0.5, "dog"),
        ),
        "white",
        0,
    )
    exact = make_caption(sc)
    r = chair_scores([exact], [sc])
    assert r["chair_i"] == 0 and r["chair_s"] == 0 and r["recall"] == 1
    r = chair_scores([exact + " and a purple triangle"], [sc])
    assert r["chair_i"] > 0 and r["chair_s"] == 1 and r["chair_i_shape"] > 0
    # wrong colour on a present shape: hallucinated attribute, not a wrong object
    r = chair_scores(["a red circle"], [sc])
    assert r["chair_i"] == 1 and r["chair_i_shape"] == 0
    # plurals, synonyms, negation and quoted words
    text = 'Two tiny navy balls, a big crimson box, a "triangle" sign, no cross and a green star.'
    assert [(m.shape, m.colour) for m in parse_mentions(text)] == [
        ("circle", "blue"),
        ("square", "red"),
        ("star", "green"),
    ]
    r = chair_scores([text, "some crosses and diamonds"], [sc, sc])
    assert r["chair_s"] == 0.5 and r["chair_i"] == 2 / 5
    # caption 1 covers the 3 (shape, colour) pairs of its scene, caption 2 none of 3
    assert r["recall"] == 0.5
    assert chair_scores(["nothing"], [sc])["recall"] == 0


# ----------------------------------------------------------------------- rendering


def test_render_size_mode_and_colours() -> None:
    sc = Scene(
        (
            Obj("square", "red", "large", 0.25, 0.25),
            Obj("circle", "blue", "medium", 0.75, 0.75),
        ),
        "white",
        0,
    )
    img = render(sc)
    assert img.mode == "RGB" and img.size == (336, 336)
    assert img.getpixel((84, 84)) == COLOURS["red"]
    assert img.getpixel((252, 252)) == COLOURS["blue"]
    assert img.getpixel((300, 20)) == BACKGROUNDS["white"]
    for size in (32, 64, (64, 48), 512):
        small = render(sc, size)
        want = (size, size) if isinstance(size, int) else size
        assert small.size == want and small.mode == "RGB"
    assert render(sc, small_size=64).tobytes() == render(sc, 64).tobytes()
    r, g, b = render(sc, 64).getpixel((16, 16))
    assert r > 150 and g < 80 and b < 80  # still red after downsampling


def test_word_is_drawn() -> None:
    plain = Scene((Obj("circle", "green", "large", 0.5, 0.4),), "white", 0)
    worded = Scene((Obj("circle", "green", "large", 0.5, 0.4, "cat"),), "white", 0)
    other = Scene((Obj("circle", "green", "large", 0.5, 0.4, "dog"),), "white", 0)
    a, b, c = render(plain), render(worded), render(other)
    assert a.tobytes() != b.tobytes() != c.tobytes()
    label = b.crop((130, 190, 206, 240))
    assert (0, 0, 0) in {px for _, px in label.getcolors(10_000)}


def test_video_moves_and_stays_in_bounds() -> None:
    sc = generate_scene(7)
    frames = video_scenes(sc, 60, seed=3)
    assert frames[0] == sc and len(frames) == 60
    for k in range(len(sc.objects)):
        xs = {round(f.objects[k].x, 6) for f in frames}
        assert len(xs) > 10  # it moves
    for f in frames:
        for o in f.objects:
            x0, y0, x1, y1 = o.bbox()
            assert -1e-9 <= x0 and x1 <= 1 + 1e-9 and -1e-9 <= y0 and y1 <= 1 + 1e-9
    # constant velocity away from the borders: equal steps on consecutive frames
    o0, o1, o2 = (frames[t].objects[0] for t in (0, 1, 2))
    if all(0.2 < o.x < 0.8 and 0.2 < o.y < 0.8 for o in (o0, o1, o2)):
        assert abs((o1.x - o0.x) - (o2.x - o1.x)) < 1e-9
    imgs = render_video(sc, 4, seed=3, size=64)
    assert len(imgs) == 4 and all(im.size == (64, 64) for im in imgs)
    assert imgs[0].tobytes() != imgs[3].tobytes()
    assert [im.tobytes() for im in imgs] == [
        im.tobytes() for im in render_video(sc, 4, seed=3, size=64)
    ]


# ----------------------------------------------------------------------- dataset


def test_splits_are_disjoint() -> None:
    ranges = sorted(SPLITS.values())
    for (_, a_end), (b_start, _) in itertools.pairwise(ranges):
        assert a_end <= b_start
    assert list(split_seeds("val", 3, 5)) == [
        SPLITS["val"][0] + 5 + i for i in range(3)
    ]
    with pytest.raises(ValueError):
        split_seeds("train", 10, SPLITS["train"][1])
    with pytest.raises(ValueError):
        split_seeds("nope", 1)


def test_build_split_rows_and_io(tmp_path) -> None:
    t = time.perf_counter()
    rows = build_split("test", 500, 0)
    assert time.perf_counter() - t < 3.0
    assert len({r["id"] for r in rows}) == len(rows)
    assert {r["seed"] for r in rows} == set(split_seeds("test", 500))
    for r in rows[:50]:
        assert {"id", "question", "answer", "family", "seed", "scene"} <= set(r)
        assert scene_of(r) == generate_scene(r["seed"])
    small = build_split("val", 3, 0, image_dir=tmp_path / "img", image_size=64)
    for r in small:
        assert Image.open(r["image_path"]).size == (64, 64)
    write_jsonl(small, tmp_path / "x" / "val.jsonl")
    assert read_jsonl(tmp_path / "x" / "val.jsonl") == small
    paths = save_images([generate_scene(1)], tmp_path / "p")
    assert paths[0].endswith("1.png")
