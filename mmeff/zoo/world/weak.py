"""Weak-evidence scenes: shapes-world scenes on which the zoo VLMs hallucinate measurably.

The ordinary test scenes are easy for the zoo models (CHAIR_s of a few percent), so a mitigator's effect
cannot be seen on them. These scenes weaken the visual evidence the way real photographs do, without
touching the models:

- **many objects** (``n_objects``), drawn **small**;
- **low contrast**: each object's colour is blended towards the background (``contrast`` = 1 keeps it,
  0 makes it invisible);
- **occlusion**: background-coloured bars cross some objects (``occlude`` = probability per object);
- **noise**: Gaussian pixel noise (``noise`` = standard deviation in 0..255 units);
- **broken co-occurrence**: every scene holds at least one trigger shape (star, cross, diamond) whose
  biased partner (circle, square, triangle) is absent, so a model leaning on the world's priors names a
  shape that is not there.

Scenes are a pure function of ``(seed, knobs)``. Seeds come from the *test* split (held out from training)
starting at :data:`SEED_OFFSET`, away from the seeds the dense evaluation uses.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import replace

import numpy as np
from PIL import Image, ImageDraw

from .dataset import split_seeds
from .render import render
from .scene import BACKGROUNDS, COLOURS, COOCCUR, SHAPES, Obj, Scene, _place

SEED_OFFSET = 50_000
"""Weak scenes use test-split seeds from ``1_100_000 + SEED_OFFSET`` on (held out, disjoint from eval_dense)."""


@dataclasses.dataclass(frozen=True)
class WeakKnobs:
    """How much the visual evidence is weakened (defaults: the tuned bench setting, docs/hallucination.md)."""

    n_objects: tuple[int, int] = (4, 7)   # inclusive range of objects per scene
    small_prob: float = 0.8                # chance an object is drawn small (else medium)
    contrast: float = 0.9                  # 1 = full colour, 0 = the background colour
    occlude: float = 0.5                   # chance an object is crossed by a background-coloured bar
    noise: float = 16.0                    # Gaussian pixel noise (0..255 units)
    backgrounds: tuple[str, ...] = ("gray",)


def weak_seeds(n: int, offset: int = 0) -> range:
    """``n`` held-out test-split seeds for weak scenes."""
    return split_seeds("test", n, SEED_OFFSET + offset)


def weak_scene(seed: int, knobs: WeakKnobs = WeakKnobs()) -> Scene:
    """A crowded scene of small objects with at least one trigger shape whose partner is absent."""
    rng = random.Random(f"weak-{seed}")
    trigger = rng.choice(sorted(COOCCUR))
    banned = {COOCCUR[trigger]}
    allowed = [s for s in SHAPES if s not in banned]
    n = rng.randint(*knobs.n_objects)
    shapes = [trigger] + [rng.choice(allowed) for _ in range(n - 1)]
    while True:
        objs = [Obj(s, rng.choice(list(COLOURS)), "small" if rng.random() < knobs.small_prob else "medium", 0.0, 0.0)
                for s in shapes]
        placed = _place(rng, objs, 1.0)
        if placed is not None:
            break
        shapes = shapes[:-1]  # crowded: drop one object and retry
    return Scene(objects=tuple(placed), background=rng.choice(list(knobs.backgrounds)), seed=seed)


def render_weak(scene: Scene, knobs: WeakKnobs = WeakKnobs()) -> Image.Image:
    """Render ``scene`` with low-contrast colours, occluding bars and pixel noise (deterministic per seed)."""
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float64)
    faded = scene.with_objects([replace(o) for o in scene.objects])
    img = np.asarray(render(faded), dtype=np.float64)
    base = np.asarray(render(scene.with_objects([])), dtype=np.float64)
    img = base + knobs.contrast * (img - base)  # blend every object pixel towards the background
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    rng = random.Random(f"weak-render-{scene.seed}")
    draw = ImageDraw.Draw(pil)
    unit = min(scene.width, scene.height)
    fill = tuple(int(c) for c in bg)
    for o in scene.objects:
        if rng.random() < knobs.occlude:
            r = o.radius * unit
            cx, cy = o.x * scene.width, o.y * scene.height
            if rng.random() < 0.5:
                draw.rectangle((cx - r, cy - 0.3 * r, cx + r, cy + 0.3 * r), fill=fill)
            else:
                draw.rectangle((cx - 0.3 * r, cy - r, cx + 0.3 * r, cy + r), fill=fill)
    arr = np.asarray(pil, dtype=np.float64)
    if knobs.noise > 0:
        noise = np.random.default_rng(scene.seed).normal(0.0, knobs.noise, arr.shape)
        arr = arr + noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def absent_partners(scene: Scene) -> list[str]:
    """Biased partner shapes that are absent although their trigger is present (adversarial negatives)."""
    present = scene.shapes()
    return [p for t, p in COOCCUR.items() if t in present and p not in present]
