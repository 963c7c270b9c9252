"""Load mmeff's shipped diffusion zoo models by name, anything else with ``from_pretrained``.

- ``"tiny-sd3"``: the tiny :class:`diffusers.StableDiffusion3Pipeline` trained on 64x64 shapes-world images
  (``mmeff/zoo/models/tiny-sd3/``; its ``training.json`` gives the recipe, the lineage and the prompt family:
  layout prompts that name each object's cell, :mod:`mmeff.zoo.prompt_family`). Call it with
  ``height=64, width=64, max_sequence_length=36`` (see :data:`TINY_SD3_CALL`).
- ``"tiny-clip-judge"``: the tiny open_clip judge (:class:`mmeff.zoo.judge.Judge`), built by
  ``python -m mmeff.zoo.train_judge``.
- any other string: ``diffusers.DiffusionPipeline.from_pretrained(name_or_path)`` (a local folder works
  offline; a hub id needs the hub).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError

MODELS_DIR = Path(__file__).resolve().parent / "models"
PIPELINES = {"tiny-sd3": "train_sd3", "tiny-clip-judge": "train_judge"}
TINY_SD3_CALL: dict[str, Any] = {"height": 64, "width": 64, "max_sequence_length": 36}
"""Call arguments that match how the shipped tiny-sd3 was trained (64 px, 36 text tokens)."""


def load_pipeline(name_or_path: str | os.PathLike[str], *, device: str = "cpu", dtype: Any = None) -> Any:
    """A diffusers pipeline (``"tiny-sd3"`` or a path / hub id) or the judge (``"tiny-clip-judge"``)."""
    s = os.fspath(name_or_path)
    if s == "tiny-clip-judge":
        from .judge import Judge

        return Judge.load(MODELS_DIR / s)
    if s in PIPELINES:
        path = MODELS_DIR / s
        if not (path / "model_index.json").is_file():
            raise ConfigError(f"zoo pipeline {s!r} is not built: {path} has no model_index.json. Build it with "
                              f"`python -m mmeff.zoo.{PIPELINES[s]}`")
        s = str(path)
    elif s.startswith("tiny-"):
        raise ConfigError(f"unknown zoo pipeline {s!r}; shipped: {sorted(PIPELINES)} (or give a path / hub id)")
    return open_pipeline(s, device=device, dtype=dtype)


def open_pipeline(source: str, *, device: str = "cpu", dtype: Any = None) -> Any:
    """``DiffusionPipeline.from_pretrained(source)`` on ``device`` (optionally cast to ``dtype``), every
    module component in eval mode and the progress bar off: how mmeff's tools use a pipeline."""
    from diffusers import DiffusionPipeline

    kwargs: dict[str, Any] = {} if dtype is None else {"torch_dtype": dtype}
    pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if hasattr(component, "eval") and hasattr(component, "parameters"):
            component.eval()
    return pipe
