"""Load a VLM and its processor: mmeff's shipped zoo models by name, anything else by path/hub id.

``load("tiny-llava")`` / ``load("tiny-qwen2-vl")`` read ``mmeff/zoo/models/<name>/`` (model
and processor saved with ``save_pretrained``; built by ``python -m mmeff.zoo.train_vlm``).
Any other string goes to ``from_pretrained`` unchanged: a local folder (works offline) or
a hub id such as ``llava-hf/llava-1.5-7b-hf`` when the hub can be reached.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError

MODELS_DIR = Path(__file__).resolve().parent / "models"
ZOO_MODELS: dict[str, str] = {
    "tiny-llava": "llava",
    "tiny-qwen2-vl": "qwen2_vl",
    "tiny-llava-tokendrop": "llava",
    "tiny-qwen2-vl-tokendrop": "qwen2_vl",
}
"""Shipped model name -> processor family. The ``-tokendrop`` models are the pruning test bed: their parent
fine-tuned with method-agnostic token drops (``docs/pruning-testbed.md``, lineage in their ``training.json``)."""

ZOO_PARENTS: dict[str, str] = {"tiny-llava-tokendrop": "tiny-llava", "tiny-qwen2-vl-tokendrop": "tiny-qwen2-vl"}
"""Fine-tuned zoo model -> the zoo model it was fine-tuned from (same architecture and processor)."""


def zoo_path(name: str) -> Path:
    """Folder of the shipped zoo model ``name`` (whether or not it has been built)."""
    if name not in ZOO_MODELS:
        raise ConfigError(f"unknown zoo model {name!r}; choose from {sorted(ZOO_MODELS)}")
    return MODELS_DIR / name


def training_info(name_or_path: str) -> dict[str, Any] | None:
    """The ``training.json`` written next to a zoo model (None when absent)."""
    path = zoo_path(name_or_path) if name_or_path in ZOO_MODELS else Path(name_or_path)
    f = path / "training.json"
    return json.loads(f.read_text()) if f.is_file() else None


def resolve_source(name_or_path: str | os.PathLike[str]) -> str:
    """What ``from_pretrained`` is given for a name: a zoo folder, a local path or a hub id (checked, not loaded)."""
    s = os.fspath(name_or_path)
    if s in ZOO_MODELS:
        path = zoo_path(s)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"zoo model {s!r} is not built: {path} has no config.json. Build it with "
                f"`python -m mmeff.zoo.train_vlm --model {s}`"
            )
        return str(path)
    if s.startswith("tiny-") or (not Path(s).exists() and s.count("/") != 1):
        raise ConfigError(
            f"unknown model {s!r}: not a zoo model ({', '.join(sorted(ZOO_MODELS))}), "
            "not a local folder and not a hub id of the form 'owner/name'"
        )
    return s


def _model_class(config: Any) -> Any:
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0]
    if arch and hasattr(transformers, arch):
        return getattr(transformers, arch)
    return transformers.AutoModelForImageTextToText


def load(
    name_or_path: str | os.PathLike[str],
    *,
    device: str = "cpu",
    attn_implementation: str = "sdpa",
    dtype: Any = None,
) -> tuple[Any, Any]:
    """``(model, processor)`` for a zoo name, a local folder or a hub id; model in eval mode.

    Raises :class:`~mmeff.core.errors.ConfigError` for an unknown name or an unbuilt zoo
    model (the message says how to build it).
    """
    from transformers import AutoConfig, AutoProcessor

    src = resolve_source(name_or_path)
    try:
        config = AutoConfig.from_pretrained(src)
    except OSError as e:
        raise ConfigError(f"cannot load model config from {src!r}: {e}") from e
    cls = _model_class(config)
    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = cls.from_pretrained(src, **kwargs)
    processor = AutoProcessor.from_pretrained(src)
    model.to(device)
    model.eval()
    return model, processor
