"""``keep=N``: the visual tokens kept per image after the cut (official FastV / EntropyPrune "rank"),
beside ``budget=`` (the layer-averaged equivalent budget)."""
from __future__ import annotations

import pytest
import torch

import mmeff
from mmeff.core.errors import BudgetError, ConfigError
from mmeff.eval.runner import sweep_label, with_budget
from mmeff.pruners import EntropyPrune, FastV, RandomPrune


def test_keep_is_the_count_after_the_cut_and_budget_the_layer_average():
    assert FastV(keep=64).keep_count(576, 32, 2) == 64
    # the class docstring's worked example: LLaVA-1.5-7B, budget 64 at layer 2 keeps 29 of 576
    assert FastV(budget=64).keep_count(576, 32, 2) == 29
    assert FastV(budget=64, layer=2).keep_count(576, 32, 2) * 30 + 2 * 576 <= 64 * 32
    assert RandomPrune(keep=100).keep_count(576, 12, 0) == 100


@pytest.mark.parametrize("kwargs", [{"budget": 64, "keep": 64}, {"ratio": 0.5, "keep": 64}, {"keep": -1}, {}])
def test_keep_is_exclusive_with_budget_and_ratio(kwargs):
    with pytest.raises(ConfigError, match="keep"):
        FastV(**kwargs)


def test_keep_above_the_image_tokens_is_a_budget_error():
    with pytest.raises(BudgetError, match="keep=600"):
        FastV(keep=600).keep_count(576, 12, 2)


def test_sweep_replaces_keep_with_the_swept_budget():
    assert with_budget("fastv:keep=64,layer=2", 128) == "fastv:budget=128,layer=2"
    assert sweep_label("fastv:keep=64,layer=2") == "fastv:layer=2"


@pytest.mark.parametrize("spec", ["fastv:keep=64,layer=2", "entropyprune:keep=64,layer=2"])
def test_keep_on_the_zoo_model_keeps_exactly_n_after_layer_k(spec):
    from mmeff.zoo import load
    from mmeff.zoo.world import generate_scene, render

    torch.manual_seed(0)
    model, processor = load("tiny-llava")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[render(generate_scene(3))], text=[prompt], return_tensors="pt")
    n_layers = model.config.text_config.num_hidden_layers
    with mmeff.apply(model, spec) as h, torch.inference_mode():
        model(**inputs)
        rep = h.report()
    assert rep["kept_after_layer_per_sample"] == [64]
    assert rep["visual_tokens_per_sample"] == [576]
    assert rep["equivalent_budget"] == pytest.approx((2 * 576 + (n_layers - 2) * 64) / n_layers)
    assert EntropyPrune(keep=64).keep_count(576, n_layers, 2) == 64


def test_keep_everything_is_dense_and_remove_is_exact():
    """No-op contract: keep=N with N = all visual tokens reproduces the unmodified logits exactly."""
    from mmeff.zoo import load
    from mmeff.zoo.world import generate_scene, render

    model, processor = load("tiny-llava")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[render(generate_scene(4))], text=[prompt], return_tensors="pt")
    with torch.inference_mode():
        dense = model(**inputs).logits
        with mmeff.apply(model, "fastv:keep=576,layer=2"):
            kept_all = model(**inputs).logits
        after = model(**inputs).logits
    assert torch.equal(kept_all, dense) and torch.equal(after, dense)
