"""Shipping a saved zoo pipeline: no training-machine paths in the package, nothing half-shipped."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmeff.zoo.ship import LOCAL_KEY, MODELS_DIR, config_files, ship

DIFFUSION_MODELS = ["tiny-wan", "tiny-sd3"]


def _with_local_paths(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for f in config_files(dst):
        cfg = json.loads(f.read_text())
        cfg[LOCAL_KEY] = f"/work/runs/somewhere/{f.parent.name}"
        f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return dst


@pytest.mark.parametrize("name", DIFFUSION_MODELS)
def test_shipped_configs_hold_no_local_path(name):
    files = config_files(MODELS_DIR / name)
    assert len(files) >= 3
    leaked = [str(f) for f in files if LOCAL_KEY in json.loads(f.read_text())]
    assert leaked == [], f"re-ship with python -m mmeff.zoo.ship: {leaked}"


def test_ship_strips_local_paths_and_loads(tmp_path):
    src = _with_local_paths(MODELS_DIR / "tiny-wan", tmp_path / "saved")
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny-wan").mkdir()
    (models / "tiny-wan" / "stale.txt").write_text("old")
    target = ship(src, "tiny-wan", models_dir=models)
    assert target == models / "tiny-wan"
    assert not (target / "stale.txt").exists()
    for f in config_files(target):
        assert LOCAL_KEY not in json.loads(f.read_text())
    assert (target / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        MODELS_DIR / "tiny-wan" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert [p.name for p in models.iterdir()] == ["tiny-wan"]  # no staging folder left behind


def test_ship_refuses_a_folder_that_does_not_load_and_keeps_the_old_model(tmp_path):
    src = _with_local_paths(MODELS_DIR / "tiny-wan", tmp_path / "saved")
    (src / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    models = tmp_path / "models"
    (models / "tiny-wan").mkdir(parents=True)
    (models / "tiny-wan" / "old.txt").write_text("old")
    with pytest.raises(ValueError, match="does not load") as err:
        ship(src, "tiny-wan", models_dir=models)
    assert "\n" not in str(err.value)  # one line
    assert (models / "tiny-wan" / "old.txt").read_text() == "old"
    assert [p.name for p in models.iterdir()] == ["tiny-wan"]


def test_ship_needs_a_pipeline_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        ship(tmp_path, "tiny-wan", models_dir=tmp_path)
