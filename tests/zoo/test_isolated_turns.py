"""Packed training turns compute exactly the single-question chat of inference."""
from __future__ import annotations

import random

import pytest
import torch

from mmeff.zoo.isolated_turns import isolate_turns, isolation_mask, restart_positions


def test_mask_is_causal_within_segment_plus_prefix():
    seg = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])
    m = isolation_mask(seg)[0, 0]
    assert m.shape == (7, 7)
    assert m[3].tolist() == [True, True, True, True, False, False, False]
    assert m[5].tolist() == [True, True, False, False, True, True, False]  # turn 2 never sees turn 1
    assert m[2, 3].item() is False  # causal
    assert m[6].tolist() == [True] + [False] * 6  # padding row: first token only, never empty
    assert not m[:, 6].any()  # nothing attends to padding


def test_positions_restart_after_prefix_on_every_axis():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, -1]])
    flat = torch.arange(9)[None]
    assert restart_positions(flat, seg).tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 8]]
    mrope = torch.stack([flat, flat + 10, flat + 20])  # (axes, batch, L)
    out = restart_positions(mrope, seg)
    assert out[:, 0, 5].tolist() == [3, 13, 23]
    with pytest.raises(ValueError, match="batch, length"):
        isolation_mask(seg[0])


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
def test_each_packed_turn_equals_the_single_question_chat(name, one_thread):
    """Logits of turn k inside the packed sequence equal those of the chat holding only the
    image and question k (the layout used at inference): no turn reads another's answer."""
    from mmeff.zoo.load import ZOO_MODELS
    from mmeff.zoo.processors import build_processor
    from mmeff.zoo.train_vlm import Batcher, _split_aux, build_model

    proc = build_processor(ZOO_MODELS[name])
    model = build_model(name, proc, layers=2).eval()
    batcher = Batcher(name, proc)
    batch, _ = _split_aux(batcher.batch([5, 6], random.Random(1)))
    seg = batch["segment_ids"]
    with torch.no_grad():
        packed = model(**isolate_turns(model, batch), use_cache=False).logits
    qwen = name == "tiny-qwen2-vl"
    checked = 0
    for b in range(2):
        prefix = (seg[b] == 0).nonzero().squeeze(-1)
        for k in (1, 3, int(seg[b].max())):
            turn = (seg[b] == k).nonzero().squeeze(-1)
            idx = torch.cat([prefix, turn])
            ids = batch["input_ids"][b, idx][None]
            single = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if qwen:
                pix = batch["pixel_values"]
                single["pixel_values"] = pix.reshape(2, -1, pix.shape[-1])[b]
                single["image_grid_thw"] = batch["image_grid_thw"][b : b + 1]
                single["mm_token_type_ids"] = batch["mm_token_type_ids"][b, idx][None]
            else:
                single["pixel_values"] = batch["pixel_values"][b : b + 1]
            with torch.no_grad():
                alone = model(**single, use_cache=False).logits[0, len(prefix):]
            torch.testing.assert_close(packed[b, turn], alone, rtol=1e-4, atol=1e-4)
            checked += 1
    assert checked == 6
    # and the packing matters: with the flat causal mask a later turn does see the earlier ones
    flat = {k: v for k, v in batch.items() if k != "segment_ids"}
    with torch.no_grad():
        leaky = model(**flat, use_cache=False).logits
    last = (seg[0] == int(seg[0].max())).nonzero().squeeze(-1)
    assert not torch.allclose(leaky[0, last], packed[0, last], atol=1e-3)


def test_drill_adds_every_shape_question():
    from mmeff.zoo.load import ZOO_MODELS
    from mmeff.zoo.processors import build_processor
    from mmeff.zoo.train_vlm import Batcher
    from mmeff.zoo.world import SHAPES

    proc = build_processor(ZOO_MODELS["tiny-qwen2-vl"])
    plain, drill = Batcher("tiny-qwen2-vl", proc), Batcher("tiny-qwen2-vl", proc, drill=True)
    ids0, _, seg0 = plain.sequence(11, random.Random(0))
    ids1, _, seg1 = drill.sequence(11, random.Random(0))
    assert max(seg1) > max(seg0)
    text = proc.tokenizer.decode(ids1)
    for s in SHAPES:
        assert text.count(f"Is there a {s} in the image?") >= 1
