"""What every calibration result file carries: the versions it ran with, written where the method reads it."""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch


def versions(*extra: str) -> dict[str, str]:
    """Versions of mmeff, torch, transformers and python, plus the named packages (e.g. ``"optuna"``)."""
    import importlib

    import transformers

    from .. import __version__

    out = {"mmeff": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    out.update({name: importlib.import_module(name).__version__ for name in extra})
    out["python"] = platform.python_version()
    return out


def save(result: dict[str, Any], out_path: str | Path | None) -> dict[str, Any]:
    """Write ``result`` as indented JSON at ``out_path`` (folders created); no-op without a path."""
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(result, indent=2))
    return result
