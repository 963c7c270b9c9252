"""Read the ``training.json`` a zoo training script saved next to its model, checking its format."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_training_json(folder: Path, expected_format: str, writer: str) -> dict[str, Any]:
    """The parsed ``folder/training.json``; clear errors when it is missing or from another script."""
    meta_path = Path(folder) / "training.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} has no training.json; pass a folder written by {writer}")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != expected_format:
        raise ValueError(f"{folder} is format {meta.get('format')!r}, expected {expected_format!r}")
    return meta
