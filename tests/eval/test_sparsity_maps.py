"""Sparsity maps of tiny-wan: warm-up steps and dense layers blank, the rest measured; PNG and JSON written."""
from __future__ import annotations

import json
import math

import torch

from mmeff.zoo.load_video import video_pipeline_path


def test_sparsity_maps_on_tiny_wan(tmp_path):
    from mmeff.eval.sparsity_maps import main

    torch.set_num_threads(1)
    out = tmp_path / "sm.png"
    assert main(["--steps", "3", "--out", str(out)]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    n_layers = json.loads((video_pipeline_path("tiny-wan") / "transformer" / "config.json").read_text())["num_layers"]
    assert out.stat().st_size > 10_000 and doc["steps"] == 3 and doc["layers"] == n_layers
    rect = doc["methods"]["rectified_spaattn d=0.75"]
    grid = rect["step_layer"]
    assert all(math.isnan(x) for x in grid[0] + grid[1])            # warmup_steps=2
    assert math.isnan(grid[2][0]) and all(0.2 < x < 1 for x in grid[2][1:])  # layer 0 dense
    assert sorted(rect["block_masks_last_step"], key=int) == [str(i) for i in range(1, n_layers)]
    first_frame = [row[:4] for row in rect["block_masks_last_step"]["1"][0][:4]]
    assert first_frame == [[1] * 4] * 4  # Wan's first frame (4 blocks of 16 tokens) attends densely
    assert "vmoba top-k" in doc["methods"] and "torch" in doc["versions"]
