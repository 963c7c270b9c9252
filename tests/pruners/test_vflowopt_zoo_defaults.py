"""The zoo models ship VFlowOpt's calibration (vflowopt.json): the method picks it up and reproduces its objective."""
from __future__ import annotations

import json

import pytest
import torch

import mmeff
from mmeff.calibrate.cli_calibrate import question_batches
from mmeff.calibrate.vflowopt_bo import last_token_states
from mmeff.pruners import VFlowOpt
from mmeff.pruners.vflowopt_schedule import average_budget
from mmeff.zoo.load import load, zoo_path


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
def test_zoo_calibration_is_the_default_and_reproduces_its_objective(name):
    torch.set_num_threads(1)
    path = zoo_path(name) / "vflowopt.json"
    data = json.loads(path.read_text())
    model, processor = load(name)
    n_layers = len(model.model.language_model.layers)
    method = VFlowOpt(budget=data["budget"])
    bound = method.bound_to(model)
    assert bound.calibration == str(path)
    p = bound.params(data["n_visual"], n_layers)
    assert p.llm_layers == tuple(data["llm_layers"])
    assert (p.vit_t, p.vit_m, p.alpha_v, p.ratio_v) == pytest.approx(
        tuple(data["params"][k] for k in ("vit_t", "vit_m", "alpha_v", "ratio_v")))
    assert average_budget(data["n_visual"], p.ratio_v, p.llm_ratios, p.llm_layers, n_layers) == pytest.approx(
        data["budget"])
    batches = list(question_batches(processor, data["samples"], data["batch_size"]))
    with torch.no_grad():
        dense = last_token_states(model, batches)
        with mmeff.apply(model, method) as h:  # no calibration= given: the zoo file is used
            pruned = last_token_states(model, batches)
            rep = h.report()
    cosine = float(torch.nn.functional.cosine_similarity(dense, pruned, dim=-1).mean())
    assert cosine == pytest.approx(data["objective_mean_cosine"], abs=1e-4)
    assert rep["equivalent_budget"] == pytest.approx(data["budget"], abs=1.0)  # integer token counts per cut
