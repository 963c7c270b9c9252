"""Question families with exact answers, canonical captions and diffusion prompts.

Every answer is derived from the :class:`Scene` itself, so it is correct by
construction. Answers are short canonical strings: ``yes``/``no``, a colour word, a size
word, a number in digits, ``left``/``right``, ``above``/``below``, or the printed word.

Families (``QA.family``):

- ``existence``: "Is there a {shape} in the image?" POPE-style: for each negative
  setting (``meta["pope"]``: ``random``, ``popular`` = the most frequent absent shape of
  the world, ``adversarial`` = the absent biased partner of a present shape) one negative
  and one positive question, so every setting is balanced. A setting with no possible
  negative is skipped.
- ``colour``: "What colour is the {ref}?" only when ``ref`` (shape, maybe with size)
  picks exactly one object.
- ``size``: "What size is the {ref}?" (small / medium / large).
- ``count``: "How many {shapes} are there?" (0 included) and "How many objects are there?".
- ``position``: left/right or above/below between two uniquely referable objects whose
  centres differ by at least :data:`MIN_SEPARATION` along the asked axis.
- ``reading``: "What word is written in the image?" when the scene has a word.
- ``caption``: "Describe the image." with :func:`make_caption` as the reference.

``meta["biased"]`` marks questions on which a prior of
:data:`~mmeff.zoo.world.scene.BIASES` pulls towards one answer (adversarial negatives,
the colour of a star, the size of a red square), so evaluation can slice by it.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from .scene import BIASES, COOCCUR, PLURALS, POPULAR, SHAPES, Obj, Scene

FAMILIES: tuple[str, ...] = (
    "existence",
    "colour",
    "size",
    "count",
    "position",
    "reading",
    "caption",
)
POPE_SETTINGS: tuple[str, ...] = ("random", "popular", "adversarial")
MIN_SEPARATION = 0.1
"""Minimum normalised distance between two centres for a position question."""

CAPTION_PROMPT = "Describe the image."
READING_PROMPT = "What word is written in the image?"


@dataclass
class QA:
    """One question with its exact short answer; ``meta`` says what it is about."""

    family: str
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- phrases

# Attribute sets tried for a referring expression, shortest first.
_REF_ATTRS: tuple[tuple[str, ...], ...] = (
    ("shape",),
    ("colour", "shape"),
    ("size", "shape"),
    ("size", "colour", "shape"),
)


def _phrase(o: Obj, attrs: Iterable[str]) -> str:
    return " ".join(getattr(o, a) for a in ("size", "colour", "shape") if a in attrs)


def refer(
    scene: Scene, index: int, *, exclude: str | None = None
) -> tuple[str, dict[str, str]] | None:
    """Shortest phrase (e.g. ``"small red circle"``) naming exactly object ``index``,
    never using attribute ``exclude``; returns (phrase, attributes used) or None."""
    o = scene.objects[index]
    for attrs in _REF_ATTRS:
        if exclude in attrs:
            continue
        used = {a: getattr(o, a) for a in attrs}
        matches = [
            p for p in scene.objects if all(getattr(p, a) == v for a, v in used.items())
        ]
        if len(matches) == 1:
            return _phrase(o, attrs), used
    return None


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def describe_object(o: Obj, *, with_word: bool = True) -> str:
    """Canonical noun phrase: size (omitted when medium), colour, shape, label."""
    words = ([] if o.size == "medium" else [o.size]) + [o.colour, o.shape]
    text = _article(" ".join(words))
    if with_word and o.word is not None:
        text += f' labelled "{o.word}"'
    return text


def _join(parts: list[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def make_caption(scene: Scene, *, with_words: bool = True) -> str:
    """Canonical caption: the objects from left to right, e.g.
    ``a large red square, a small blue circle and a green star``."""
    objs = sorted(scene.objects, key=lambda o: (o.x, o.y))
    return _join([describe_object(o, with_word=with_words) for o in objs])


def make_prompt(scene: Scene) -> str:
    """Short text-to-image prompt: the caption without words, plus the background."""
    return f"{make_caption(scene, with_words=False)} on a {scene.background} background"


# --------------------------------------------------------------------------- families


def _existence(scene: Scene, rng: random.Random) -> list[QA]:
    present = sorted(scene.shapes(), key=SHAPES.index)
    absent = [s for s in SHAPES if s not in scene.shapes()]
    out: list[QA] = []
    for setting in POPE_SETTINGS:
        neg: str | None = None
        extra: dict[str, Any] = {}
        if setting == "random" and absent:
            neg = rng.choice(absent)
        elif setting == "popular" and absent:
            neg = next(s for s in POPULAR if s in absent)
        elif setting == "adversarial":
            cands = [(t, p) for t, p in COOCCUR.items() if t in present and p in absent]
            if cands:
                trigger, neg = rng.choice(cands)
                extra = {"trigger": trigger, "biased": True}
        if neg is None:
            continue
        pos = rng.choice(present)
        pair = [
            QA(
                "existence",
                f"Is there a {pos} in the image?",
                "yes",
                {"pope": setting, "shape": pos, "biased": False},
            ),
            QA(
                "existence",
                f"Is there a {neg} in the image?",
                "no",
                {"pope": setting, "shape": neg, "biased": False, **extra},
            ),
        ]
        rng.shuffle(pair)
        out.extend(pair)
    return out


def _is_biased_colour(o: Obj) -> bool:
    return any(b.kind == "colour" and b.given[0] == o.shape for b in BIASES)


def _is_biased_size(o: Obj) -> bool:
    return any(b.kind == "size" and b.given == (o.colour, o.shape) for b in BIASES)


def _attribute(scene: Scene, rng: random.Random, attr: str, k: int) -> list[QA]:
    idx = list(range(len(scene.objects)))
    rng.shuffle(idx)
    out: list[QA] = []
    for i in idx:
        ref = refer(scene, i, exclude=attr)
        if ref is None:
            continue
        o = scene.objects[i]
        biased = _is_biased_colour(o) if attr == "colour" else _is_biased_size(o)
        out.append(
            QA(
                attr,
                f"What {attr} is the {ref[0]}?",
                getattr(o, attr),
                {"target": i, "ref": ref[1], "biased": biased},
            )
        )
        if len(out) == k:
            break
    return out


def _count(scene: Scene, rng: random.Random) -> list[QA]:
    present = sorted(scene.shapes(), key=SHAPES.index)
    absent = [s for s in SHAPES if s not in scene.shapes()]
    asked = [rng.choice(present)]
    if absent and rng.random() < 0.3:
        asked.append(rng.choice(absent))
    out = [
        QA(
            "count",
            f"How many {PLURALS[s]} are there?",
            str(scene.count(s)),
            {"shape": s},
        )
        for s in asked
    ]
    if rng.random() < 0.3:
        out.append(
            QA(
                "count",
                "How many objects are there?",
                str(len(scene.objects)),
                {"shape": None},
            )
        )
    return out


def _position(scene: Scene, rng: random.Random, k: int) -> list[QA]:
    n = len(scene.objects)
    refs = {i: refer(scene, i) for i in range(n)}
    pairs = [
        (i, j) for i in range(n) for j in range(n) if i != j and refs[i] and refs[j]
    ]
    rng.shuffle(pairs)
    out: list[QA] = []
    for i, j in pairs:
        a, b = scene.objects[i], scene.objects[j]
        axes = [
            ax
            for ax, d in (("x", b.x - a.x), ("y", b.y - a.y))
            if abs(d) >= MIN_SEPARATION
        ]
        if not axes:
            continue
        axis = rng.choice(axes)
        ra, rb = refs[i][0], refs[j][0]  # type: ignore[index]
        yes_no = rng.random() < 0.5
        if axis == "x":
            rel = "left" if a.x < b.x else "right"
            if yes_no:
                q, ans = (
                    f"Is the {ra} to the left of the {rb}?",
                    "yes" if rel == "left" else "no",
                )
            else:
                q, ans = f"Is the {ra} to the left or to the right of the {rb}?", rel
        else:
            rel = "above" if a.y < b.y else "below"
            if yes_no:
                q, ans = (
                    f"Is the {ra} above the {rb}?",
                    "yes" if rel == "above" else "no",
                )
            else:
                q, ans = f"Is the {ra} above or below the {rb}?", rel
        out.append(
            QA(
                "position",
                q,
                ans,
                {
                    "a": i,
                    "b": j,
                    "axis": axis,
                    "relation": rel,
                    "ref_a": refs[i][1],
                    "ref_b": refs[j][1],  # type: ignore[index]
                },
            )
        )
        if len(out) == k:
            break
    return out


def _reading(scene: Scene) -> list[QA]:
    for i, o in enumerate(scene.objects):
        if o.word is not None:
            return [QA("reading", READING_PROMPT, o.word, {"target": i})]
    return []


def grounding_drill(scene: Scene, rng: random.Random | None = None, positions: int = 0) -> list[QA]:
    """Existence of every shape and the count of every present shape (the questions that need
    the question's shape word matched against the image, asked exhaustively), plus up to
    ``positions`` relative-position questions drawn with ``rng``. Training-only extra turns
    (the benchmark splits keep :func:`make_questions`)."""
    if positions and rng is None:
        raise ValueError("grounding_drill needs an rng to draw position questions")
    present = scene.shapes()
    out = [
        QA("existence", f"Is there a {s} in the image?", "yes" if s in present else "no",
           {"pope": "drill", "shape": s, "biased": False})
        for s in SHAPES
    ]
    out += [
        QA("count", f"How many {PLURALS[s]} are there?", str(scene.count(s)), {"shape": s})
        for s in SHAPES if s in present
    ]
    if positions:
        out += _position(scene, rng, positions)
    return out


def make_questions(
    scene: Scene,
    rng: random.Random | int,
    *,
    families: Iterable[str] | None = None,
    per_family: int = 2,
) -> list[QA]:
    """All questions for ``scene`` (deterministic given ``rng``'s state or int seed).

    ``families`` restricts to a subset of :data:`FAMILIES`; ``per_family`` caps the
    colour, size and position questions (existence gives up to 2 per POPE setting).
    """
    if isinstance(rng, int):
        rng = random.Random(rng)
    wanted = tuple(families) if families is not None else FAMILIES
    unknown = set(wanted) - set(FAMILIES)
    if unknown:
        raise ValueError(
            f"unknown question families {sorted(unknown)}; choose from {FAMILIES}"
        )
    out: list[QA] = []
    # Always draw from rng in the same order so a family subset does not change the others.
    generated = {
        "existence": _existence(scene, rng),
        "colour": _attribute(scene, rng, "colour", per_family),
        "size": _attribute(scene, rng, "size", max(1, per_family // 2)),
        "count": _count(scene, rng),
        "position": _position(scene, rng, per_family),
        "reading": _reading(scene),
        "caption": [QA("caption", CAPTION_PROMPT, make_caption(scene), {})],
    }
    for fam in FAMILIES:
        if fam in wanted:
            out.extend(generated[fam])
    return out
