"""ReferentPositionAux: the read-out of a position question's objects' centres at their phrase's last token."""
from __future__ import annotations

import random

import pytest
import torch


def test_referent_indices_point_at_each_phrase_end_and_targets_are_the_objects_centres() -> None:
    from mmeff.zoo.load import ZOO_MODELS
    from mmeff.zoo.processors import build_processor
    from mmeff.zoo.train_vlm import Batcher
    from mmeff.zoo.world import generate_scene
    from mmeff.zoo.world.questions import refer

    proc = build_processor(ZOO_MODELS["tiny-qwen2-vl"])
    batcher = Batcher("tiny-qwen2-vl", proc, drill=True, position_drill=4)
    checked = 0
    for seed in range(20):
        ids, _, segments, refs = batcher.sequence_with_referents(seed, random.Random(seed))
        scene = generate_scene(seed)
        centres = {(o.x, o.y) for o in scene.objects}
        phrase_ends = {refer(scene, i)[0].split()[-1] for i in range(len(scene.objects)) if refer(scene, i)}
        assert len(refs) % 2 == 0
        for (a_tok, *a_xy), (b_tok, *b_xy) in zip(refs[::2], refs[1::2]):
            assert segments[a_tok] == segments[b_tok] > 0  # both in one question turn, a before b
            assert a_tok < b_tok
            for tok, xy in ((a_tok, a_xy), (b_tok, b_xy)):
                word = proc.tokenizer.convert_ids_to_tokens(ids[tok]).lstrip("\u2581")
                assert word in phrase_ends  # the phrase's last word: its shape
                assert tuple(xy) in centres
            assert proc.tokenizer.convert_ids_to_tokens(ids[b_tok + 1]) == "?"
            checked += 1
    assert checked >= 20


def test_referent_readout_trains_the_layers_below_it(one_thread) -> None:
    from mmeff.zoo.isolated_turns import isolate_turns
    from mmeff.zoo.lm_position_aux import decoder_layers
    from mmeff.zoo.load import ZOO_MODELS
    from mmeff.zoo.processors import build_processor
    from mmeff.zoo.referent_position_aux import ReferentPositionAux
    from mmeff.zoo.train_vlm import Batcher, _split_aux, build_model

    proc = build_processor(ZOO_MODELS["tiny-qwen2-vl"])
    model = build_model("tiny-qwen2-vl", proc, layers=3)
    batcher = Batcher("tiny-qwen2-vl", proc, drill=True, position_drill=2)
    aux = ReferentPositionAux(model, 1)
    inputs, targets = _split_aux(batcher.batch([5, 6], random.Random(1)))
    assert targets["referent_index"].shape[0] > 0
    model(**isolate_turns(model, inputs), use_cache=False)
    loss, r2 = aux.loss(targets["referent_index"], targets["referent_xy"])
    assert torch.isfinite(loss) and set(r2) == {"ref_x_r2", "ref_y_r2"}
    loss.backward()
    layers = decoder_layers(model)
    grad = lambda layer: sum(float(p.grad.abs().sum()) for p in layer.parameters() if p.grad is not None)  # noqa: E731
    assert grad(layers[0]) > 0 and grad(layers[1]) > 0 and grad(layers[2]) == 0
    model(**isolate_turns(model, inputs), use_cache=False)
    empty, logged = aux.loss(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert float(empty.detach()) == 0.0 and logged == {}
    with pytest.raises(RuntimeError, match="no LM hidden states"):
        aux.loss(targets["referent_index"], targets["referent_xy"])
    with pytest.raises(ValueError, match="referent position layer"):
        ReferentPositionAux(model, 3)
    aux.remove()


def test_phrase_offsets_name_both_objects() -> None:
    from mmeff.zoo.referent_position_aux import referent_token_ends

    q = "Is the red circle to the left of the circle?"
    a, b = referent_token_ends(q, "red circle", "circle")
    assert q[:a].endswith("the red circle") and q[:b].endswith("of the circle")
    with pytest.raises(ValueError, match="cannot find"):
        referent_token_ends(q, "square", "circle")
