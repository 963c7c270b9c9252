"""The kept-token figure: one cell per (method, budget), answers and kept indices saved next to the PNG."""
from __future__ import annotations

import json

import torch


def test_figure_and_json(tmp_path):
    from mmeff.eval.kept_token_figure import main

    torch.set_num_threads(1)
    out = tmp_path / "kt.png"
    assert main(["--model", "tiny-qwen2-vl", "--seed", "3", "--method", "random", "--method", "fastv",
                 "--budgets", "100,60", "--out", str(out)]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert out.stat().st_size > 10_000
    assert [(c["method"], c["budget"]) for c in doc["cells"]] == [("random", 100), ("random", 60), ("fastv", 100), ("fastv", 60)]
    random_cells = [c for c in doc["cells"] if c["method"] == "random"]
    assert [len(c["kept_visual_index"]) for c in random_cells] == [100, 60]  # pre-LLM: the budget is the count
    assert all(max(c["kept_visual_index"]) < 144 for c in doc["cells"])
    assert doc["config"]["budgets"] == [100, 60] and "torch" in doc["versions"]


def test_chain_methods_are_labelled_with_every_cut():
    from mmeff.eval.kept_token_figure import _kept_label

    chain = {"layer": 4, "kept_after_layer": 19, "cut_layers": [0, 4, 8], "kept_per_cut": [116, 57, 19]}
    assert _kept_label(chain) == "keeps 116/57/19 at layers 0/4/8"
    one_cut = {"layer": 1, "kept_after_layer": 17, "cut_layers": [1], "kept_per_cut": [17]}
    assert _kept_label(one_cut) == "keeps 17 from layer 1"
