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
        assert len(refs) % 3 == 0
        for (a_tok, *a_xy, _), (b_tok, *b_xy, _), (final, dx, dy, _) in zip(refs[::3], refs[1::3], refs[2::3]):
            assert proc.tokenizer.convert_ids_to_tokens(ids[final]) == "<|assistant|>" and segments[final] == segments[a_tok]
            assert (dx, dy) == (a_xy[0] - b_xy[0], a_xy[1] - b_xy[1])
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
    assert targets["referent_index"].shape[0] == 2 * targets["compare_index"].shape[0] > 0
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


def test_object_token_mask_covers_the_object_box() -> None:
    from mmeff.zoo.referent_position_aux import object_token_mask

    ids = torch.tensor([[1] + [7] * 16 + [2]])  # one 4x4 grid of image tokens
    mask = object_token_mask(ids, 7, torch.tensor([0, 0]), torch.tensor([[0.2, 0.2], [0.9, 0.6]]),
                             torch.tensor([0.1, 0.01]))
    grid = mask[:, 1:17].reshape(2, 4, 4)
    assert mask[:, 0].sum() == 0 and mask[:, 17].sum() == 0  # text tokens never
    assert grid[0].nonzero().tolist() == [[0, 0]]  # cell centres 0.125: only the top-left is within 0.1 of 0.2
    assert grid[1].nonzero().tolist() == [[2, 3]]  # a tiny object still gets the cell it sits in (row 2, col 3)
    with pytest.raises(ValueError, match="square grid"):
        object_token_mask(torch.tensor([[7, 7, 7]]), 7, torch.tensor([0]), torch.zeros(1, 2), torch.zeros(1))


def test_pointer_loss_trains_the_head_and_remove_restores_the_layer(one_thread) -> None:
    from mmeff.zoo.isolated_turns import isolate_turns
    from mmeff.zoo.lm_position_aux import decoder_layers
    from mmeff.zoo.load import ZOO_MODELS
    from mmeff.zoo.processors import build_processor
    from mmeff.zoo.referent_position_aux import ReferentAttentionAux
    from mmeff.zoo.train_vlm import Batcher, _split_aux, build_model

    proc = build_processor(ZOO_MODELS["tiny-qwen2-vl"])
    model = build_model("tiny-qwen2-vl", proc, layers=3)
    batcher = Batcher("tiny-qwen2-vl", proc, drill=True, position_drill=2)
    inputs, t = _split_aux(batcher.batch([5, 6], random.Random(1)))
    inputs = isolate_turns(model, inputs)
    with torch.no_grad():
        dense = model(**inputs, use_cache=False).logits
    config = decoder_layers(model)[1].self_attn.config
    ptr = ReferentAttentionAux(model, 1, 2, batcher.image_token_id)
    assert decoder_layers(model)[1].self_attn.config._attn_implementation == "eager"
    assert decoder_layers(model)[0].self_attn.config._attn_implementation != "eager"
    out = model(**inputs, use_cache=False)
    torch.testing.assert_close(out.logits, dense, rtol=1e-4, atol=1e-4)  # eager computes the same function
    loss, log = ptr.loss(inputs["input_ids"], t["referent_index"], t["referent_xy"], t["referent_radius"])
    assert 0 < log["ref_attn_mass"] < 1 and float(loss.detach()) > 0
    loss.backward()
    layers = decoder_layers(model)
    grad = lambda layer: sum(float(p.grad.abs().sum()) for p in layer.parameters() if p.grad is not None)  # noqa: E731
    assert grad(layers[1]) > 0 and grad(layers[0]) > 0 and grad(layers[2]) == 0
    ptr.remove()
    assert decoder_layers(model)[1].self_attn.config is config
    with pytest.raises(ValueError, match="referent attention head"):
        ReferentAttentionAux(model, 1, 9, batcher.image_token_id)


def test_gather_loss_reads_the_final_rows_at_both_phrase_ends(one_thread) -> None:
    """PhraseGatherAux: head 0 at the final token on A's phrase end, head 1 on B's; gradients stop at its layer."""
    from mmeff.zoo.isolated_turns import isolate_turns
    from mmeff.zoo.lm_position_aux import decoder_layers
    from mmeff.zoo.load import ZOO_MODELS
    from mmeff.zoo.processors import build_processor
    from mmeff.zoo.referent_position_aux import PhraseGatherAux
    from mmeff.zoo.train_vlm import Batcher, _split_aux, build_model

    proc = build_processor(ZOO_MODELS["tiny-llava"])
    model = build_model("tiny-llava", proc, layers=3)
    batcher = Batcher("tiny-llava", proc, drill=True, position_drill=2)
    inputs, t = _split_aux(batcher.batch([5, 6], random.Random(1)))
    inputs = isolate_turns(model, inputs)
    gather = PhraseGatherAux(model, 1, (0, 1))
    model(**inputs, use_cache=False)
    weights = gather.weights.detach()
    loss, log = gather.loss(t["referent_index"], t["compare_index"])
    ref, fin = t["referent_index"], t["compare_index"]
    expected = torch.cat([weights[fin[:, 0], 0, fin[:, 1], ref[0::2, 1]], weights[fin[:, 0], 1, fin[:, 1], ref[1::2, 1]]])
    assert log["gather_w"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(-expected.log().mean()), rel=1e-5)
    loss.backward()
    layers = decoder_layers(model)
    grad = lambda layer: sum(float(p.grad.abs().sum()) for p in layer.parameters() if p.grad is not None)  # noqa: E731
    assert grad(layers[1]) > 0 and grad(layers[2]) == 0
    gather.remove()
    assert decoder_layers(model)[1].self_attn.config._attn_implementation != "eager"
    with pytest.raises(ValueError, match="two different heads"):
        PhraseGatherAux(model, 1, (0, 0))
    with pytest.raises(ValueError, match="need two referents"):
        PhraseGatherAux(model, 1, (0, 1)).loss(ref[:3], fin)


def test_pointer_and_gather_on_one_layer_restore_it_when_removed_in_reverse() -> None:
    from mmeff.zoo.lm_position_aux import decoder_layers
    from mmeff.zoo.load import ZOO_MODELS
    from mmeff.zoo.processors import build_processor
    from mmeff.zoo.referent_position_aux import PhraseGatherAux, ReferentAttentionAux
    from mmeff.zoo.train_vlm import build_model

    proc = build_processor(ZOO_MODELS["tiny-llava"])
    model = build_model("tiny-llava", proc, layers=3)
    config = decoder_layers(model)[1].self_attn.config
    pointer = ReferentAttentionAux(model, 1, 0, model.config.image_token_id)
    gather = PhraseGatherAux(model, 1, (1, 2))
    gather.remove()
    pointer.remove()
    assert decoder_layers(model)[1].self_attn.config is config
