"""`mmeff calibrate entropyprune` end to end on the shipped tiny-llava (offline)."""
from __future__ import annotations

import json

import torch

from mmeff.cli import main
from mmeff.pruners import EntropyPrune


def test_calibrate_cli_writes_a_loadable_json(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    out = tmp_path / "ecl.json"
    assert main(["calibrate", "entropyprune", "--model", "tiny-llava", "--samples", "2", "--batch-size", "2",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["samples"] == 2 and data["model"] == "tiny-llava"
    from mmeff.zoo.load import zoo_path

    n_layers = json.loads((zoo_path("tiny-llava") / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert len(data["layer_entropy"]) == n_layers and 1 <= data["ecl"] <= n_layers - 1
    assert all(0.0 <= e <= 1.0 for e in data["layer_entropy"])
    assert EntropyPrune(budget=300, calibration=str(out)).resolve_layer("llava") == data["ecl"]
