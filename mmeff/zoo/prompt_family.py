"""Which prompts a zoo diffusion pipeline was trained on, and held-out scenes and prompts of that kind.

Two families:

- ``"world"``: world scenes (:func:`~mmeff.zoo.world.generate_scene`) with ``make_prompt``, which names the
  objects but not where they are. tiny-sd3 up to the ``64px`` recipe and tiny-wan were trained on these.
- ``"layout"``: layout scenes (:mod:`mmeff.zoo.world.layout`), whose prompts name every object's cell of a
  3 x 3 grid. The ``layout64`` tiny-sd3 is trained on these.

A pipeline's family is in its ``training.json`` (``prompt_family``, or the recipe's ``data``). Evaluations, the
demo and the benchmarks ask :func:`pipeline_family`, so they prompt a model the way it was trained. Pipelines
without a ``training.json`` (random test pipelines, hub checkpoints) are ``"world"``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FAMILIES = ("world", "layout")


def folder_family(folder: str | Path | None) -> str:
    """The family recorded in ``folder/training.json`` (``"world"`` when there is none)."""
    if folder is None:
        return "world"
    f = Path(folder) / "training.json"
    if not f.is_file():
        return "world"
    meta = json.loads(f.read_text())
    family = meta.get("prompt_family") or (meta.get("recipe_config") or {}).get("data") or "world"
    return family if family in FAMILIES else "world"


def pipeline_family(pipe: Any) -> str:
    """The family of a loaded pipeline, from the folder it was loaded from."""
    name = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    return folder_family(name)


def held_out_scenes(family: str, split: str, n: int, offset: int = 0) -> list[Any]:
    """``n`` scenes of the world split ``split`` of ``family``."""
    from .world import build_scenes
    from .world.layout import build_layout_scenes

    check(family)
    return build_layout_scenes(split, n, offset) if family == "layout" else build_scenes(split, n, offset)


def scene_of_seed(family: str, seed: int) -> Any:
    from .world import generate_scene
    from .world.layout import generate_layout_scene

    check(family)
    return generate_layout_scene(seed) if family == "layout" else generate_scene(seed)


def prompt_of(family: str, scene: Any) -> str:
    """The text-to-image prompt of ``scene`` in ``family``."""
    from .world import make_prompt
    from .world.layout import make_layout_prompt

    check(family)
    return make_layout_prompt(scene) if family == "layout" else make_prompt(scene)


def video_prompt_of(family: str, scene: Any, frames: int = 13) -> str:
    """The text-to-video prompt of ``scene`` in ``family``: a layout prompt also names each object's direction
    over ``frames`` frames."""
    from .world.layout import make_layout_video_prompt

    check(family)
    return make_layout_video_prompt(scene, frames) if family == "layout" else prompt_of(family, scene)


def check(family: str) -> None:
    if family not in FAMILIES:
        from ..core.errors import ConfigError

        raise ConfigError(f"unknown prompt family {family!r}; choose one of {FAMILIES}")
