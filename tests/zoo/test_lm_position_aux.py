"""LMPositionAux: the training-only read-out of image-token grid positions from one LM layer."""
from __future__ import annotations

import random

import pytest
import torch


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
def test_position_readout_trains_the_layers_below_it(name, one_thread):
    from mmeff.zoo.isolated_turns import isolate_turns
    from mmeff.zoo.lm_position_aux import LMPositionAux, decoder_layers
    from mmeff.zoo.load import ZOO_MODELS
    from mmeff.zoo.processors import build_processor
    from mmeff.zoo.train_vlm import Batcher, _split_aux, build_model

    proc = build_processor(ZOO_MODELS[name])
    model = build_model(name, proc, layers=3)
    batcher = Batcher(name, proc)
    aux = LMPositionAux(model, 1, batcher.image_token_id)
    batch, _ = _split_aux(batcher.batch([5, 6], random.Random(1)))
    model(**isolate_turns(model, batch), use_cache=False)
    loss, r2 = aux.loss(batch["input_ids"])
    assert torch.isfinite(loss) and set(r2) == {"row_r2", "col_r2"}
    loss.backward()
    layers = decoder_layers(model)
    grad = lambda layer: sum(float(p.grad.abs().sum()) for p in layer.parameters() if p.grad is not None)  # noqa: E731
    assert grad(layers[0]) > 0 and grad(layers[1]) > 0
    assert grad(layers[2]) == 0  # above the read-out layer: untouched
    assert aux.head.weight.grad is not None
    with pytest.raises(RuntimeError, match="no LM hidden states"):
        aux.loss(batch["input_ids"])  # the captured states are used once
    aux.remove()
    model(**isolate_turns(model, batch), use_cache=False)
    assert aux.hidden is None  # the hook is gone


def test_targets_follow_the_raster_grid() -> None:
    from mmeff.zoo.lm_position_aux import LMPositionAux

    class Fake(torch.nn.Module):  # the minimal model shape LMPositionAux hooks into
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.language_model = torch.nn.Module()
            self.model.language_model.layers = torch.nn.ModuleList([torch.nn.Identity()])
            self.config = type("C", (), {"text_config": type("T", (), {"hidden_size": 2})()})()

    fake = Fake()
    aux = LMPositionAux(fake, 0, image_token_id=7)
    ids = torch.tensor([[1, 7, 7, 7, 7, 2]])
    grid = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])  # (row, col) of a 2x2 grid
    hidden = torch.zeros(1, 6, 2)
    hidden[0, 1:5] = grid
    with torch.no_grad():
        aux.head.weight.copy_(torch.eye(2))
        aux.head.bias.zero_()
    fake.model.language_model.layers[0](hidden)
    loss, r2 = aux.loss(ids)
    assert float(loss.detach()) == pytest.approx(0.0) and r2["row_r2"] == pytest.approx(1.0) and r2["col_r2"] == pytest.approx(1.0)
    fake.model.language_model.layers[0](hidden)
    with pytest.raises(ValueError, match="square grid"):
        aux.loss(torch.tensor([[1, 7, 7, 7, 2, 2]]))
    with pytest.raises(ValueError, match="lm position layer"):
        LMPositionAux(fake, 3, image_token_id=7)


def test_init_from_keeps_the_saved_rope_base(tmp_path) -> None:
    """A continuation must not silently swap the RoPE base the saved model was trained with."""
    from mmeff.zoo.load import ZOO_MODELS, zoo_path
    from mmeff.zoo.processors import build_processor
    from mmeff.zoo.train_vlm import build_model, saved_rope_theta

    assert saved_rope_theta(zoo_path("tiny-qwen2-vl")) == 50.0  # the shipped stage-4 model
    proc = build_processor(ZOO_MODELS["tiny-qwen2-vl"])
    build_model("tiny-qwen2-vl", proc, layers=1, rope_theta=1234.0).save_pretrained(tmp_path)
    assert saved_rope_theta(tmp_path) == 1234.0
