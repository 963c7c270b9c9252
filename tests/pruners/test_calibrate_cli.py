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


def test_calibrate_adaptinfer_writes_a_schedule_the_method_reads(tmp_path, monkeypatch):
    from mmeff.pruners import AdaptInfer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    out = tmp_path / "adaptinfer.json"
    assert main(["calibrate", "adaptinfer", "--model", "tiny-qwen2-vl", "--samples", "2", "--batch-size", "2",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["method"] == "adaptinfer" and data["samples"] == 2 and data["n_layers"] == 8
    assert len(data["jaccard_shift"]) == 7 and all(0.0 <= s <= 1.0 for s in data["jaccard_shift"])
    assert len(data["layers"]) == 3 and data["layers"] == sorted(set(data["layers"])) and data["layers"][-1] <= 6
    assert AdaptInfer(budget=64, schedule=str(out)).plan_layers("qwen2_vl", 8) == tuple(data["cut_layers"])
    assert main(["calibrate", "adaptinfer", "--model", "tiny-qwen2-vl", "--top-fraction", "2", "--out",
                 str(out)]) == 2


def test_inflection_layers_are_the_largest_peaks():
    from mmeff.calibrate import inflection_layers

    shift = [0.0, 0.9, 0.2, 0.1, 0.5, 0.3, 0.35, 0.6]
    assert inflection_layers(shift, 3) == [1, 4, 7]
    assert inflection_layers([0.0, 0.1, 0.2, 0.3], 2) == [2, 3]  # one peak; the next largest fills in
