"""Load mmeff's shipped video diffusion zoo models by name, anything else with ``from_pretrained``.

- ``"tiny-wan"``: the tiny :class:`diffusers.WanPipeline` trained on 64x64, 13-frame moving-shapes videos
  (``mmeff/zoo/models/tiny-wan/``, built by ``python -m mmeff.zoo.train_wan``). Call it with
  :data:`TINY_WAN_CALL` (``height=64, width=64, num_frames=13, max_sequence_length=48``): the text encoder was
  trained on prompts padded to 48 tokens, and 13 frames at 64 px give the 4 x 8 x 8 = 256-token latent grid.
  Guide it with :data:`TINY_WAN_CFG` (3.0).
- any other string: ``diffusers.DiffusionPipeline.from_pretrained(name_or_path)`` (a local folder works
  offline; a hub id needs the hub).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from .load_pipeline import open_pipeline

MODELS_DIR = Path(__file__).resolve().parent / "models"
VIDEO_PIPELINES = {"tiny-wan": "train_wan"}
TINY_WAN_CALL: dict[str, Any] = {"height": 64, "width": 64, "num_frames": 13, "max_sequence_length": 48}
"""Call arguments that match how tiny-wan was trained."""
TINY_WAN_CFG = 3.0
"""tiny-wan's guidance scale, chosen on 48 val prompts by :mod:`mmeff.eval.choose_guidance` (2026-12-03,
`docs/results/tiny-wan-cfg-val.json`): the most videos with all their colours among the scales within 0.01 of
the best shape existence. Lower scales lose shape existence, higher ones lose colours and persistence."""


def video_pipeline_path(name: str) -> Path:
    """The folder of a shipped video pipeline (raises :class:`ConfigError` if it is not built)."""
    if name not in VIDEO_PIPELINES:
        raise ConfigError(f"unknown zoo video pipeline {name!r}; shipped: {sorted(VIDEO_PIPELINES)}")
    path = MODELS_DIR / name
    if not (path / "model_index.json").is_file():
        raise ConfigError(f"zoo video pipeline {name!r} is not built: {path} has no model_index.json. Build it "
                          f"with `python -m mmeff.zoo.{VIDEO_PIPELINES[name]}`")
    return path


def load_video_pipeline(name_or_path: str | os.PathLike[str], *, device: str = "cpu", dtype: Any = None) -> Any:
    """A diffusers video pipeline: ``"tiny-wan"`` or a path / hub id; eval mode, progress bar off."""
    s = os.fspath(name_or_path)
    if s in VIDEO_PIPELINES:
        s = str(video_pipeline_path(s))
    elif s.startswith("tiny-") and not Path(s).exists():
        raise ConfigError(f"unknown zoo video pipeline {s!r}; shipped: {sorted(VIDEO_PIPELINES)} "
                          "(or give a path / hub id)")
    return open_pipeline(s, device=device, dtype=dtype)
