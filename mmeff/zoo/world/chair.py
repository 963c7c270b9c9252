"""CHAIR-style hallucination metrics for free-text captions of shapes-world scenes.

A caption is parsed into *mentions*: a shape noun (singular, plural or a synonym such as
"ball" or "rhombus") with the colour and size adjectives directly in front of it
("two small red balls" -> circle, red, small). Quoted text (the printed word) is
ignored, and so are negated mentions ("no star", "without a cross").

A mention is **hallucinated** when no object of the scene has its shape and, if the
mention names one, its colour. Per set of captions:

- ``chair_i``: hallucinated mentions / all mentions (unique per caption);
- ``chair_s``: captions with at least one hallucinated mention / all captions;
- ``recall``: (shape, colour) pairs of the scenes covered by some mention / all pairs
  (a mention without colour covers every colour of its shape);
- ``chair_i_shape``: like ``chair_i`` but judging the shape only (object-level CHAIR).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .scene import COLOURS, SHAPES, SIZES, Scene

SHAPE_SYNONYMS: dict[str, str] = {
    **{s: s for s in SHAPES},
    "ball": "circle",
    "disc": "circle",
    "disk": "circle",
    "dot": "circle",
    "box": "square",
    "rectangle": "square",
    "block": "square",
    "cube": "square",
    "pyramid": "triangle",
    "pentagram": "star",
    "rhombus": "diamond",
    "rhombi": "diamond",
    "lozenge": "diamond",
}
"""Surface word (singular) -> canonical shape."""

COLOUR_SYNONYMS: dict[str, str] = {
    **{c: c for c in COLOURS},
    "crimson": "red",
    "scarlet": "red",
    "gold": "yellow",
    "golden": "yellow",
    "lime": "green",
    "navy": "blue",
    "azure": "blue",
    "violet": "purple",
    "lilac": "purple",
    "magenta": "pink",
    "rose": "pink",
    "tan": "brown",
}

SIZE_SYNONYMS: dict[str, str] = {
    **{s: s for s in SIZES},
    "tiny": "small",
    "little": "small",
    "big": "large",
    "huge": "large",
    "mid": "medium",
}

_NEGATIONS = {"no", "without", "not", "nor"}
_SKIP_BEFORE_NEGATION = {"a", "an", "the", "any"}
_TOKEN = re.compile(r"[a-z]+|[^\sa-z]")
_QUOTED = re.compile(r"\"[^\"]*\"|“[^”]*”")


@dataclass(frozen=True)
class Mention:
    """One object a caption talks about."""

    shape: str
    colour: str | None = None
    size: str | None = None


def _singular(word: str) -> str | None:
    """Canonical shape for a (possibly plural) surface word, or None."""
    if word in SHAPE_SYNONYMS:
        return SHAPE_SYNONYMS[word]
    if word.endswith("es") and word[:-2] in SHAPE_SYNONYMS:
        return SHAPE_SYNONYMS[word[:-2]]
    if word.endswith("s") and word[:-1] in SHAPE_SYNONYMS:
        return SHAPE_SYNONYMS[word[:-1]]
    return None


def parse_mentions(caption: str) -> list[Mention]:
    """Unique mentions of ``caption`` in order of first appearance."""
    text = _QUOTED.sub(" ", caption.lower())
    tokens = _TOKEN.findall(text)
    out: list[Mention] = []
    for i, tok in enumerate(tokens):
        shape = _singular(tok)
        if shape is None:
            continue
        colour = size = None
        j = i - 1
        while j >= 0 and (tokens[j] in COLOUR_SYNONYMS or tokens[j] in SIZE_SYNONYMS):
            if tokens[j] in COLOUR_SYNONYMS and colour is None:
                colour = COLOUR_SYNONYMS[tokens[j]]
            elif tokens[j] in SIZE_SYNONYMS and size is None:
                size = SIZE_SYNONYMS[tokens[j]]
            j -= 1
        while j >= 0 and tokens[j] in _SKIP_BEFORE_NEGATION:
            j -= 1
        if j >= 0 and tokens[j] in _NEGATIONS:
            continue
        m = Mention(shape, colour, size)
        if m not in out:
            out.append(m)
    return out


def _exists(m: Mention, scene: Scene, *, use_colour: bool = True) -> bool:
    return any(
        o.shape == m.shape
        and (not use_colour or m.colour is None or o.colour == m.colour)
        for o in scene.objects
    )


def hallucinated(caption: str, scene: Scene) -> list[Mention]:
    """Mentions of ``caption`` with no matching object in ``scene``."""
    return [m for m in parse_mentions(caption) if not _exists(m, scene)]


def chair_scores(captions: Sequence[str], scenes: Sequence[Scene]) -> dict[str, float]:
    """CHAIR metrics over paired ``captions`` and ``scenes`` (see the module docstring).

    Returns floats ``chair_s``, ``chair_i``, ``recall``, ``chair_i_shape`` and the
    counts ``n_captions``, ``n_mentions``.
    """
    if len(captions) != len(scenes):
        raise ValueError(f"got {len(captions)} captions for {len(scenes)} scenes")
    n_mentions = n_hall = n_hall_shape = n_bad_captions = 0
    n_pairs = n_covered = 0
    for caption, scene in zip(captions, scenes):
        mentions = parse_mentions(caption)
        bad = [m for m in mentions if not _exists(m, scene)]
        n_mentions += len(mentions)
        n_hall += len(bad)
        n_hall_shape += sum(
            1 for m in mentions if not _exists(m, scene, use_colour=False)
        )
        n_bad_captions += bool(bad)
        pairs = {(o.shape, o.colour) for o in scene.objects}
        n_pairs += len(pairs)
        n_covered += sum(
            1
            for s, c in pairs
            if any(
                m.shape == s and (m.colour is None or m.colour == c) for m in mentions
            )
        )
    return {
        "chair_s": n_bad_captions / len(captions) if captions else 0.0,
        "chair_i": n_hall / n_mentions if n_mentions else 0.0,
        "recall": n_covered / n_pairs if n_pairs else 0.0,
        "chair_i_shape": n_hall_shape / n_mentions if n_mentions else 0.0,
        "n_captions": float(len(captions)),
        "n_mentions": float(n_mentions),
    }
