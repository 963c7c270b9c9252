"""Layout scenes: the diffusion test bed's prompts, which say where every object is.

The free-form world prompt (:func:`~mmeff.zoo.world.make_prompt`) names up to six objects but not their
positions, and half of the world's scenes carry a printed label the prompt does not mention. A text-to-image
model must then invent positions and labels. A tiny model trained for an hour on a CPU averages over those
choices and draws blobs (``docs/diffusion-testbed.md``).

A layout scene puts one to three objects in distinct cells of a 3 x 3 grid, near the cell's centre (jitter
:data:`JITTER`), with no labels. Its prompt names every object's size, colour, shape and cell, e.g. ``a small red
square at the top left and a blue star in the centre on a gray background``. For video, each object also moves
in a named direction (``... moving right``), and stays inside the canvas.

Seeds use the world's splits (:data:`~mmeff.zoo.world.SPLITS`), with their own random stream, so test-split
layout scenes are never trained on.
"""
from __future__ import annotations

import random
from dataclasses import replace

from .dataset import split_seeds
from .questions import describe_object
from .scene import BACKGROUNDS, COLOURS, SHAPES, SIZE_PROBS, SIZES, Obj, Scene

GRID = 3
"""Cells per side."""

CELL_PHRASES: dict[tuple[int, int], str] = {
    (0, 0): "at the top left", (1, 0): "at the top", (2, 0): "at the top right",
    (0, 1): "on the left", (1, 1): "in the centre", (2, 1): "on the right",
    (0, 2): "at the bottom left", (1, 2): "at the bottom", (2, 2): "at the bottom right",
}
"""(column, row) -> the prompt's words for that cell."""

DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
"""Motion directions of layout videos (y grows downwards)."""

LAYOUT_WORDS: tuple[str, ...] = ("at", "the", "in", "top", "bottom", "left", "right", "centre", "moving", "up",
                                 "down")
"""Words layout prompts add to the world's vocabulary."""

MAX_OBJECTS = 3
JITTER = 0.02
"""Largest offset of an object's centre from its cell's centre (fraction of the canvas)."""

SPEED = 0.01
"""Distance a moving object travels per video frame (fraction of the canvas)."""


def cell_centre(cell: tuple[int, int]) -> tuple[float, float]:
    return ((cell[0] + 0.5) / GRID, (cell[1] + 0.5) / GRID)


def cell_of(o: Obj) -> tuple[int, int]:
    """The grid cell holding the object's centre."""
    return (min(GRID - 1, int(o.x * GRID)), min(GRID - 1, int(o.y * GRID)))


def _rng(seed: int) -> random.Random:
    return random.Random(f"layout-{seed}")


def generate_layout_scene(seed: int, *, max_objects: int = MAX_OBJECTS, jitter: float = JITTER,
                          size: int = 336) -> Scene:
    """The layout scene of ``seed``: 1..``max_objects`` objects (uniform shapes and colours, the world's size
    mix) in distinct random cells, no printed labels, a uniform background. Deterministic in its arguments."""
    if not 1 <= max_objects <= GRID * GRID:
        raise ValueError(f"max_objects must be in 1..{GRID * GRID}, got {max_objects}")
    rng = _rng(seed)
    n = rng.randint(1, max_objects)
    cells = rng.sample(sorted(CELL_PHRASES), n)
    sizes = list(SIZE_PROBS)
    objs = []
    for cell in cells:
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        size_name = rng.choices(sizes, weights=[SIZE_PROBS[s] for s in sizes])[0]
        cx, cy = cell_centre(cell)
        x = round(cx + rng.uniform(-jitter, jitter), 4)
        y = round(cy + rng.uniform(-jitter, jitter), 4)
        objs.append(Obj(shape, colour, size_name, x, y))
    return Scene(objects=tuple(objs), background=rng.choice(list(BACKGROUNDS)), seed=seed, width=size, height=size)


def reading_order(scene: Scene) -> list[Obj]:
    """Objects by cell, top row first, left to right."""
    return sorted(scene.objects, key=lambda o: (cell_of(o)[1], cell_of(o)[0]))


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def object_phrase(o: Obj, direction: str | None = None) -> str:
    text = f"{describe_object(o, with_word=False)} {CELL_PHRASES[cell_of(o)]}"
    return text if direction is None else f"{text} moving {direction}"


def make_layout_prompt(scene: Scene, directions: dict[int, str] | None = None) -> str:
    """Every object with its cell (and, for video, its direction, keyed by index in ``scene.objects``), in
    reading order, then the background."""
    order = reading_order(scene)
    idx = {id(o): i for i, o in enumerate(scene.objects)}
    parts = [object_phrase(o, None if directions is None else directions[idx[id(o)]]) for o in order]
    return f"{_join(parts)} on a {scene.background} background"


def build_layout_scenes(split: str, n: int, seed_offset: int = 0) -> list[Scene]:
    """The ``n`` layout scenes of the world split ``split``."""
    return [generate_layout_scene(s) for s in split_seeds(split, n, seed_offset)]


# --------------------------------------------------------------------------- video
def layout_directions(scene: Scene, frames: int, speed: float = SPEED) -> dict[int, str]:
    """A direction for every object (by index) that keeps its whole footprint on the canvas for ``frames``
    frames and, where possible, does not head into a neighbouring cell that holds another object (so objects
    do not cover each other); drawn from the scene's own stream, so a scene always moves the same way."""
    rng = random.Random(f"layout-motion-{scene.seed}")
    travel = speed * (frames - 1)
    occupied = {cell_of(o) for o in scene.objects}
    out = {}
    for i, o in enumerate(scene.objects):
        r = SIZES[o.size]
        fits = [d for d, (dx, dy) in DIRECTIONS.items()
                if r <= o.x + dx * travel <= 1 - r and r <= o.y + dy * travel <= 1 - r]
        cx, cy = cell_of(o)
        free = [d for d in fits if (cx + DIRECTIONS[d][0], cy + DIRECTIONS[d][1]) not in occupied]
        out[i] = rng.choice(free or fits)
    return out


def layout_video_scenes(scene: Scene, frames: int, speed: float = SPEED) -> tuple[list[Scene], dict[int, str]]:
    """The scene at each frame (objects moving in straight lines) and the directions."""
    dirs = layout_directions(scene, frames, speed)
    out = []
    for t in range(frames):
        objs = [replace(o, x=round(o.x + DIRECTIONS[dirs[i]][0] * speed * t, 4),
                        y=round(o.y + DIRECTIONS[dirs[i]][1] * speed * t, 4)) for i, o in enumerate(scene.objects)]
        out.append(scene.with_objects(objs))
    return out, dirs


def make_layout_video_prompt(scene: Scene, frames: int, speed: float = SPEED) -> str:
    """The layout prompt of the first frame with every object's direction."""
    return make_layout_prompt(scene, layout_directions(scene, frames, speed))
