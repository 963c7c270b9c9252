"""Copy a saved zoo pipeline (a training or decoder fine-tune output) into the package as a shipped model.

``python -m mmeff.zoo.ship --from <saved tiny-wan or tiny-sd3 folder> --name tiny-wan``

Why: diffusers' ``save_pretrained`` writes each component's ``_name_or_path``, the folder it was loaded from on
the training machine (``/work/runs/...``). Loading overwrites it, so it does nothing but leak a local path into
the package. The copy drops it from every component config and ``model_index.json``, checks that the copy loads
as the same pipeline class, and replaces the shipped folder only after the check (nothing is half-shipped).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"
LOCAL_KEY = "_name_or_path"


def config_files(folder: Path) -> list[Path]:
    """``model_index.json`` and every component's ``config.json`` under ``folder``."""
    return sorted([*folder.glob("model_index.json"), *folder.glob("*/config.json")])


def strip_local_paths(folder: Path) -> list[Path]:
    """Remove ``_name_or_path`` from the configs of ``folder``; returns the files changed."""
    changed = []
    for f in config_files(folder):
        cfg = json.loads(f.read_text())
        if LOCAL_KEY in cfg:
            del cfg[LOCAL_KEY]
            f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            changed.append(f)
    return changed


def ship(source: Path, name: str, models_dir: Path = MODELS_DIR) -> Path:
    """Copy ``source`` to ``models_dir/name`` without local paths, after checking it loads; returns the folder."""
    source = Path(source)
    if not (source / "model_index.json").is_file():
        raise FileNotFoundError(f"{source} has no model_index.json; pass a folder a zoo pipeline was saved to")
    from diffusers import DiffusionPipeline

    expected = json.loads((source / "model_index.json").read_text()).get("_class_name")
    with tempfile.TemporaryDirectory(dir=models_dir) as tmp:
        staged = Path(tmp) / name
        shutil.copytree(source, staged)
        strip_local_paths(staged)
        try:
            pipe = DiffusionPipeline.from_pretrained(staged, local_files_only=True)
        except Exception as e:  # any load failure means: do not ship
            first = (str(e).strip().splitlines() or [""])[0]
            raise ValueError(f"{source} does not load as a pipeline ({type(e).__name__}: {first}); "
                             "nothing shipped") from e
        if type(pipe).__name__ != expected:
            raise ValueError(f"{source} loads as {type(pipe).__name__}, its model_index.json says {expected}")
        target = models_dir / name
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staged), target)
    return target


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="source", type=Path, required=True, help="a saved zoo pipeline folder")
    ap.add_argument("--name", required=True, help="the zoo name to ship it as (e.g. tiny-wan)")
    a = ap.parse_args(argv)
    try:
        target = ship(a.source, a.name)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"shipped {a.source} as {target}")


if __name__ == "__main__":
    main()
