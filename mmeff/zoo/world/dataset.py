"""Dataset splits of the shapes world: question rows, JSONL files and rendered images.

Splits draw scenes from disjoint seed ranges, so no scene is in two splits:

==========  =========================
split       scene seeds
==========  =========================
train       [0, 1_000_000)
val         [1_000_000, 1_100_000)
test        [1_100_000, 1_200_000)
calib       [1_200_000, 1_300_000)   (calibration data for methods that fit on data)
==========  =========================

``build_split("test", n, seed_offset)`` uses seeds ``start + seed_offset ...
start + seed_offset + n - 1``. Questions of a scene come from ``random.Random(
f"questions-{seed}")``, so a row is reproducible from its seed alone.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .questions import make_questions
from .render import Size, render
from .scene import Scene, generate_scene

SPLITS: dict[str, tuple[int, int]] = {
    "train": (0, 1_000_000),
    "val": (1_000_000, 1_100_000),
    "test": (1_100_000, 1_200_000),
    "calib": (1_200_000, 1_300_000),
}
"""Split name -> [first seed, end seed) of its scenes."""


def split_seeds(name: str, n: int, seed_offset: int = 0) -> range:
    """The ``n`` scene seeds of split ``name`` starting ``seed_offset`` into its range."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; choose from {sorted(SPLITS)}")
    start, end = SPLITS[name]
    if n < 0 or seed_offset < 0 or start + seed_offset + n > end:
        raise ValueError(
            f"split {name!r} holds seeds [{start}, {end}); offset {seed_offset} + n {n} does not fit"
        )
    return range(start + seed_offset, start + seed_offset + n)


def build_scenes(name: str, n: int, seed_offset: int = 0) -> list[Scene]:
    """The ``n`` scenes of split ``name`` (see :func:`split_seeds`)."""
    return [generate_scene(s) for s in split_seeds(name, n, seed_offset)]


def question_rng(seed: int) -> random.Random:
    """The RNG that picks the questions of scene ``seed``."""
    return random.Random(f"questions-{seed}")


def build_split(
    name: str,
    n: int,
    seed_offset: int = 0,
    *,
    families: Iterable[str] | None = None,
    per_family: int = 2,
    image_dir: str | os.PathLike[str] | None = None,
    image_size: Size | None = None,
    with_scene: bool = True,
) -> list[dict[str, Any]]:
    """Question rows for ``n`` scenes of split ``name``.

    Each row: ``id``, ``split``, ``seed``, ``family``, ``question``, ``answer``, ``meta``,
    and ``scene`` (its :meth:`Scene.to_dict`, unless ``with_scene`` is False). With
    ``image_dir`` the images are rendered there (``{seed}.png``) and rows get
    ``image_path``.
    """
    fams = tuple(families) if families is not None else None
    scenes = build_scenes(name, n, seed_offset)
    paths = (
        save_images(scenes, image_dir, size=image_size)
        if image_dir is not None
        else None
    )
    rows: list[dict[str, Any]] = []
    for k, scene in enumerate(scenes):
        qas = make_questions(
            scene, question_rng(scene.seed), families=fams, per_family=per_family
        )
        scene_dict = scene.to_dict() if with_scene else None
        for j, qa in enumerate(qas):
            row: dict[str, Any] = {
                "id": f"{name}-{scene.seed}-{j:02d}",
                "split": name,
                "seed": scene.seed,
                "family": qa.family,
                "question": qa.question,
                "answer": qa.answer,
                "meta": qa.meta,
            }
            if paths is not None:
                row["image_path"] = paths[k]
            if scene_dict is not None:
                row["scene"] = scene_dict
            rows.append(row)
    return rows


def scene_of(row: dict[str, Any]) -> Scene:
    """The scene behind a row (from its stored ``scene``, else regenerated from ``seed``)."""
    if "scene" in row and row["scene"] is not None:
        return Scene.from_dict(row["scene"])
    return generate_scene(int(row["seed"]))


def save_images(
    scenes: Sequence[Scene],
    out_dir: str | os.PathLike[str],
    *,
    size: Size | None = None,
) -> list[str]:
    """Render ``scenes`` into ``out_dir`` as ``{seed}.png``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for scene in scenes:
        path = out / f"{scene.seed}.png"
        render(scene, size).save(path, format="PNG")
        paths.append(str(path))
    return paths


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write one JSON object per line (parent folders are created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read rows written by :func:`write_jsonl`."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
