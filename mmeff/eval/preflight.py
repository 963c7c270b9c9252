"""Checks ``mmeff eval`` makes before any model runs, so that bad input costs seconds, never a finished run.

- :func:`check_config`: counts and sizes (``--limit 0``, ``--batch-size -1`` ...), empty task lists,
  unknown local task names;
- :func:`check_model_name`: a zoo VLM, a local folder or a hub id, decided without loading anything;
- :func:`resolve_out`: where the JSON goes (a folder means "inside it"), proven writable by creating and
  deleting a probe file next to it;
- :func:`check_methods`: every planned method applied to the loaded model and run on one short
  generation, so that a method of the wrong kind or a budget the model cannot meet fails before the
  dense run instead of after it.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError, MmeffError
from .tasks import GROUPS, PREFIX, TASKS


def _at_least(value: int | None, minimum: int, flag: str) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{flag} must be >= {minimum}, got {value}")


def check_config(cfg: Any) -> None:
    """Raise :class:`ConfigError` for values no run could use (before any data is built)."""
    _at_least(cfg.limit, 1, "--limit")
    _at_least(cfg.n, 1, "--n")
    _at_least(cfg.batch_size, 1, "--batch-size")
    _at_least(cfg.threads, 1, "--threads")
    _at_least(cfg.seed_offset, 0, "--seed-offset")
    _at_least(cfg.bootstrap_iters, 0, "--bootstrap-iters")
    for b in cfg.budgets:
        _at_least(b, 1, "--budgets")
    if not cfg.tasks:
        raise ConfigError("no tasks given; e.g. --tasks mmeff_pope_random,mmeff_colour or --tasks mmeff_world")
    unknown = [t for t in cfg.tasks if t.startswith(PREFIX) and t not in TASKS and t not in GROUPS]
    if unknown:
        raise ConfigError(f"unknown mmeff task(s) {unknown}; the local tasks are {sorted(TASKS)} and the groups "
                          f"{sorted(GROUPS)} (`mmeff info` lists them)")
    if cfg.sweep and not cfg.methods:
        raise ConfigError("--sweep needs at least one --method whose budget it varies")


def check_model_name(name: str) -> None:
    """A zoo VLM, a local folder or an ``owner/name`` hub id; zoo *pipelines* are refused by name."""
    from ..zoo.load import resolve_source
    from ..zoo.load_pipeline import PIPELINES
    from ..zoo.load_video import VIDEO_PIPELINES

    if name in PIPELINES or name in VIDEO_PIPELINES:
        raise ConfigError(f"{name!r} is a diffusion zoo model; `mmeff eval` evaluates VLMs "
                          "(tiny-llava, tiny-qwen2-vl, or a local / hub LLaVA or Qwen-VL checkpoint)")
    resolve_source(name)
    if Path(name).is_dir() and not (Path(name) / "config.json").is_file():
        raise ConfigError(f"model folder {name!r} has no config.json; save the model there with save_pretrained")


def default_name(model: str) -> str:
    stem = model.rstrip("/").replace("/", "_") or "model"
    return f"eval-{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def resolve_out(out: str | os.PathLike[str] | None, model: str) -> Path:
    """The JSON path a run writes: ``out``, or a new file inside ``out`` when it is (or ends like) a folder.

    Raises :class:`ConfigError` when it cannot be written; nothing is left behind by the check but the
    missing parent folders it had to create.
    """
    if out is None:
        path = Path("runs") / default_name(model)
    else:
        text = os.fspath(out)
        path = Path(text)
        if path.is_dir() or text.endswith(("/", os.sep)):
            path = path / default_name(model)
    check_writable(path, "--out")
    return path


def check_writable(path: Path, flag: str) -> None:
    """Prove ``path`` can be written: its folder exists or can be made, and a probe file can be created there."""
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file name, or end the folder with '/' to write inside it")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{flag} {path} exists and is not writable; choose another path")
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".mmeff-probe-", delete=True):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(f"{flag} {path}: cannot write in {folder} ({reason}); choose a writable path") from None


def check_methods(lm: Any, specs: list[str], model_name: str) -> None:
    """Apply every spec to the loaded model and run one short generation with it; raise one
    :class:`ConfigError` naming every spec that cannot run (nothing stays applied)."""
    failures = []
    for spec in dict.fromkeys(specs):
        try:
            lm.set_methods(spec)
            lm.warmup()
        except MmeffError as e:
            failures.append(f"{spec} ({type(e).__name__}: {e})")
        finally:
            lm.remove_methods()
    if failures:
        raise ConfigError(f"{len(failures)} method run(s) cannot run on {model_name}, so nothing was run: "
                          + "; ".join(failures) + ". Fix or drop them.")
