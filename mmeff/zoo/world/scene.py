"""Scenes of the shapes world: vocabulary, bias table and the seeded scene generator.

A scene is a handful of flat coloured shapes on a plain background, optionally with one
short printed word on a white label just below one object (fine detail that visual token
pruning can lose). Positions and sizes are stored in *normalised* units (fractions of
the canvas; sizes relative to ``min(width, height)``) so one scene renders at 336 px for
the VLMs and at 32/64 px for the tiny diffusion models.

The world is deliberately biased (see :data:`BIASES`): some shapes usually come with a
partner shape, stars are usually yellow, red squares are usually large. A model that
learns these priors will "see" the partner when it is absent, so hallucination exists and
evaluation can target exactly the biased pairs.

Everything is a pure function of the integer seed (``random.Random(seed)``, never the
global RNG), so a scene can always be regenerated from its seed.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

# --------------------------------------------------------------------------- vocabulary

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
"""Shape names (singular)."""

PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
    "diamond": "diamonds",
}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (245, 215, 0),
    "green": (30, 160, 50),
    "blue": (30, 80, 230),
    "purple": (135, 45, 190),
    "pink": (255, 125, 195),
    "brown": (125, 75, 30),
}
"""Object colours: clearly distinct hues; none is white, grey or black (the backgrounds)."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}

SIZES: dict[str, float] = {"small": 0.065, "medium": 0.095, "large": 0.135}
"""Half-extent ("radius") of each size class, as a fraction of ``min(width, height)``."""

SIZE_PROBS: dict[str, float] = {"small": 0.35, "medium": 0.40, "large": 0.25}

WORDS: tuple[str, ...] = (
    "cat",
    "dog",
    "sun",
    "cup",
    "hat",
    "key",
    "pen",
    "fox",
    "owl",
    "bee",
    "moon",
    "fish",
    "book",
    "tree",
    "lamp",
    "frog",
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
    "42",
    "17",
)
"""Printed words: lower-case, at most 4 characters, never a shape, colour or size word."""

WORD_PROB = 0.5
"""Probability that a scene carries one printed word (at most one per scene)."""

# Label geometry (normalised): a white box with the word, ``LABEL_GAP`` below the object.
LABEL_H = 0.08
LABEL_GAP = 0.01


def label_width(word: str) -> float:
    """Normalised width of the white label holding ``word``."""
    return 0.05 + 0.042 * len(word)


# --------------------------------------------------------------------------- biases


@dataclass(frozen=True)
class Bias:
    """One deliberate prior of the world.

    kind ``cooccur``: if shape ``given[0]`` is present, shape ``then`` is present with
    probability ``rate``. ``colour``: each object of shape ``given[0]`` has colour
    ``then`` with probability ``rate``. ``size``: each object with colour ``given[0]`` and
    shape ``given[1]`` has size ``then`` with probability ``rate``.
    """

    kind: Literal["cooccur", "colour", "size"]
    given: tuple[str, ...]
    then: str
    rate: float
    text: str


BIASES: tuple[Bias, ...] = (
    Bias(
        "cooccur",
        ("star",),
        "circle",
        0.85,
        "a star usually appears together with a circle",
    ),
    Bias(
        "cooccur",
        ("cross",),
        "square",
        0.85,
        "a cross usually appears together with a square",
    ),
    Bias(
        "cooccur",
        ("diamond",),
        "triangle",
        0.85,
        "a diamond usually appears together with a triangle",
    ),
    Bias("colour", ("star",), "yellow", 0.85, "stars are usually yellow"),
    Bias("size", ("red", "square"), "large", 0.85, "red squares are usually large"),
)
"""The bias table, as data, so evaluation can target the biased pairs."""

COOCCUR: dict[str, str] = {b.given[0]: b.then for b in BIASES if b.kind == "cooccur"}
"""Trigger shape -> its biased partner shape. Triggers and partners are disjoint sets."""

# Presence probabilities. Triggers are drawn first; a partner's presence then depends on
# its trigger (``rate`` if the trigger is present, the base value otherwise).
TRIGGER_PRESENCE: dict[str, float] = {"star": 0.30, "cross": 0.25, "diamond": 0.20}
PARTNER_BASE_PRESENCE: dict[str, float] = {
    "circle": 0.40,
    "square": 0.35,
    "triangle": 0.30,
}

COUNT_PROBS: dict[int, float] = {1: 0.70, 2: 0.20, 3: 0.10}
"""How many copies of a present shape (before trimming to ``max_objects``)."""


def cooccur_partners(shape: str) -> list[str]:
    """Shapes that the world's priors expect next to ``shape`` (its biased partners)."""
    return [b.then for b in BIASES if b.kind == "cooccur" and b.given[0] == shape]


def shape_presence_probs() -> dict[str, float]:
    """Marginal probability that each shape is present in a scene (before the rare
    rejection of empty scenes), derived analytically from the tables above."""
    probs = dict(TRIGGER_PRESENCE)
    for trigger, partner in COOCCUR.items():
        rate = next(
            b.rate for b in BIASES if b.kind == "cooccur" and b.given[0] == trigger
        )
        p_t = TRIGGER_PRESENCE[trigger]
        probs[partner] = p_t * rate + (1 - p_t) * PARTNER_BASE_PRESENCE[partner]
    return probs


POPULAR: tuple[str, ...] = tuple(
    sorted(SHAPES, key=lambda s: (-shape_presence_probs()[s], SHAPES.index(s)))
)
"""Shapes from most to least frequent in the world (for POPE ``popular`` negatives)."""

# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class Obj:
    """One object. ``x``/``y`` are the centre in [0, 1] (y grows downwards); ``size`` is a
    key of :data:`SIZES`; ``word`` is printed on a label just below the object."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    word: str | None = None

    @property
    def radius(self) -> float:
        """Normalised half-extent of the shape itself."""
        return SIZES[self.size]

    def extent(self) -> tuple[float, float, float, float]:
        """Distances (left, top, right, bottom) from the centre to the edges of the
        object's footprint, label included."""
        r = self.radius
        if self.word is None:
            return (r, r, r, r)
        half_w = max(r, label_width(self.word) / 2)
        return (half_w, r, half_w, r + LABEL_GAP + LABEL_H)

    def bbox(self) -> tuple[float, float, float, float]:
        """Normalised footprint (x0, y0, x1, y1), label included."""
        left, top, right, bottom = self.extent()
        return (self.x - left, self.y - top, self.x + right, self.y + bottom)


@dataclass(frozen=True)
class Scene:
    """A scene: objects on a plain background; ``width``/``height`` is the native render
    size in pixels; ``seed`` regenerates it with :func:`generate_scene`."""

    objects: tuple[Obj, ...]
    background: str
    seed: int
    width: int = 336
    height: int = 336

    @property
    def word(self) -> str | None:
        """The printed word of the scene, if any."""
        for o in self.objects:
            if o.word is not None:
                return o.word
        return None

    def shapes(self) -> set[str]:
        return {o.shape for o in self.objects}

    def count(
        self,
        shape: str | None = None,
        colour: str | None = None,
        size: str | None = None,
    ) -> int:
        """Number of objects matching every attribute given."""
        return sum(1 for o in self.objects if _matches(o, shape, colour, size))

    def with_objects(self, objects: tuple[Obj, ...] | list[Obj]) -> Scene:
        return replace(self, objects=tuple(objects))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (inverse of :meth:`from_dict`)."""
        return {
            "objects": [asdict(o) for o in self.objects],
            "background": self.background,
            "seed": self.seed,
            "width": self.width,
            "height": self.height,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(
            objects=tuple(Obj(**o) for o in d["objects"]),
            background=d["background"],
            seed=int(d["seed"]),
            width=int(d.get("width", 336)),
            height=int(d.get("height", 336)),
        )


def _matches(o: Obj, shape: str | None, colour: str | None, size: str | None) -> bool:
    return (
        (shape is None or o.shape == shape)
        and (colour is None or o.colour == colour)
        and (size is None or o.size == size)
    )


# --------------------------------------------------------------------------- generator

_MARGIN = 0.01  # to the canvas border
_GAP = 0.02  # between footprints of two objects


def _weighted(rng: random.Random, table: dict[Any, float]) -> Any:
    keys = list(table)
    return rng.choices(keys, weights=[table[k] for k in keys])[0]


def _sample_shape_counts(rng: random.Random, max_objects: int) -> dict[str, int]:
    """Which shapes are present and how often, with the co-occurrence biases applied."""
    while True:
        present: dict[str, bool] = {}
        for trigger, p in TRIGGER_PRESENCE.items():
            present[trigger] = rng.random() < p
        for trigger, partner in COOCCUR.items():
            rate = next(
                b.rate for b in BIASES if b.kind == "cooccur" and b.given[0] == trigger
            )
            p = rate if present[trigger] else PARTNER_BASE_PRESENCE[partner]
            present[partner] = rng.random() < p
        shapes = [s for s in SHAPES if present.get(s)]
        if not shapes or len(shapes) > max_objects:
            continue  # empty scene (or more shapes than allowed): redraw
        counts = {s: _weighted(rng, COUNT_PROBS) for s in shapes}
        # Trim duplicates (never presence) until the scene fits in max_objects.
        while sum(counts.values()) > max_objects:
            many = [s for s in shapes if counts[s] > 1]
            counts[rng.choice(many)] -= 1
        return counts


def _sample_colour(rng: random.Random, shape: str) -> str:
    for b in BIASES:
        if b.kind == "colour" and b.given[0] == shape:
            if rng.random() < b.rate:
                return b.then
            return rng.choice([c for c in COLOURS if c != b.then])
    return rng.choice(list(COLOURS))


def _sample_size(rng: random.Random, shape: str, colour: str) -> str:
    for b in BIASES:
        if b.kind == "size" and b.given == (colour, shape):
            if rng.random() < b.rate:
                return b.then
            others = {k: v for k, v in SIZE_PROBS.items() if k != b.then}
            return _weighted(rng, others)
    return _weighted(rng, SIZE_PROBS)


def _overlaps(
    a: tuple[float, float, float, float], b: tuple[float, float, float, float]
) -> bool:
    return not (
        a[2] + _GAP <= b[0]
        or b[2] + _GAP <= a[0]
        or a[3] + _GAP <= b[1]
        or b[3] + _GAP <= a[1]
    )


def _place(rng: random.Random, objs: list[Obj], aspect: float) -> list[Obj] | None:
    """Give every object a position so no two footprints overlap; None if it failed.

    Sizes are relative to min(width, height); ``aspect`` = width/height converts them to
    per-axis fractions for non-square canvases.
    """
    sx = 1.0 / aspect if aspect > 1 else 1.0  # radius fraction along x
    sy = aspect if aspect < 1 else 1.0
    placed: list[Obj] = []
    boxes: list[tuple[float, float, float, float]] = []
    for o in objs:
        left, top, right, bottom = o.extent()
        left, right, top, bottom = left * sx, right * sx, top * sy, bottom * sy
        lo_x, hi_x = _MARGIN + left, 1 - _MARGIN - right
        lo_y, hi_y = _MARGIN + top, 1 - _MARGIN - bottom
        if lo_x > hi_x or lo_y > hi_y:
            return None
        for _ in range(200):
            x = round(rng.uniform(lo_x, hi_x), 4)
            y = round(rng.uniform(lo_y, hi_y), 4)
            box = (x - left, y - top, x + right, y + bottom)
            if not any(_overlaps(box, b) for b in boxes):
                placed.append(replace(o, x=x, y=y))
                boxes.append(box)
                break
        else:
            return None
    return placed


def generate_scene(
    seed: int,
    *,
    size: int | tuple[int, int] = 336,
    max_objects: int = 6,
    word_prob: float = WORD_PROB,
    backgrounds: tuple[str, ...] | None = None,
) -> Scene:
    """Generate the scene for ``seed`` (deterministic: same arguments, same scene).

    ``size`` is the native render size (int for square). ``max_objects`` >= 6 keeps the
    co-occurrence rates exact (smaller values redraw scenes with too many shapes, which
    shifts them slightly). ``word_prob`` is the chance of one printed word.
    """
    if max_objects < 1:
        raise ValueError("max_objects must be >= 1")
    width, height = (
        (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    )
    rng = random.Random(seed)
    bg_names = backgrounds or tuple(BACKGROUNDS)
    background = rng.choice(list(bg_names))
    counts = _sample_shape_counts(rng, max_objects)

    objs: list[Obj] = []
    for shape in SHAPES:
        for _ in range(counts.get(shape, 0)):
            colour = _sample_colour(rng, shape)
            objs.append(Obj(shape, colour, _sample_size(rng, shape, colour), 0.0, 0.0))
    rng.shuffle(objs)
    if rng.random() < word_prob:
        i = rng.randrange(len(objs))
        objs[i] = replace(objs[i], word=rng.choice(WORDS))

    # Place big footprints first; retry with fresh positions. Crowded scenes (rare) shrink
    # one object per 20 failed attempts, so sizes stay as drawn in practically all scenes.
    def area(o: Obj) -> float:
        x0, y0, x1, y1 = o.bbox()
        return (x1 - x0) * (y1 - y0)

    attempts = 0
    while True:
        order = sorted(range(len(objs)), key=lambda i: -area(objs[i]))
        placed = _place(rng, [objs[i] for i in order], width / height)
        if placed is not None:
            break
        attempts += 1
        if attempts % 20 == 0:
            big = [i for i in order if objs[i].size != "small"]
            if not big:
                raise RuntimeError(f"could not place the objects of scene {seed}")
            objs[big[0]] = replace(
                objs[big[0]], size="medium" if objs[big[0]].size == "large" else "small"
            )
    # Keep the shuffled order (not the placement order) in the scene.
    by_index = dict(zip(order, placed))
    final = tuple(by_index[i] for i in range(len(objs)))
    return Scene(
        objects=final, background=background, seed=seed, width=width, height=height
    )
