"""lm_transplant: tiny-llava's LM started from tiny-qwen2-vl's computes the same function on text."""
from __future__ import annotations

import pytest
import torch


def test_identity_plan_spreads_the_extra_layers() -> None:
    from mmeff.zoo.lm_transplant import identity_layer_plan

    assert identity_layer_plan(8, 12) == [0, 1, None, 2, 3, None, 4, 5, None, 6, 7, None]
    assert identity_layer_plan(3, 3) == [0, 1, 2]
    plan = identity_layer_plan(2, 7)
    assert [d for d in plan if d is not None] == [0, 1] and len(plan) == 7
    with pytest.raises(ValueError, match="fewer than the donor"):
        identity_layer_plan(4, 3)


def test_transplanted_llava_lm_equals_the_qwen_lm_on_text(tmp_path, one_thread) -> None:
    from mmeff.zoo.lm_transplant import donor_text_config, transplant_lm
    from mmeff.zoo.load import ZOO_MODELS
    from mmeff.zoo.processors import build_processor
    from mmeff.zoo.train_vlm import _load_donor, build_model

    qwen = build_model("tiny-qwen2-vl", build_processor(ZOO_MODELS["tiny-qwen2-vl"]), layers=3, rope_theta=500.0)
    with torch.no_grad():  # random q/k/v biases, so a dropped bias would show
        for layer in qwen.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    qwen.save_pretrained(tmp_path)
    donor = _load_donor(tmp_path)
    shape = {k: v for k, v in donor_text_config(tmp_path).items() if k != "layers"}
    llava = build_model("tiny-llava", build_processor(ZOO_MODELS["tiny-llava"]), layers=5, rope_theta=500.0, **shape)
    assert llava.config.text_config.attention_bias
    plan = transplant_lm(llava, donor)
    assert plan == [0, 1, None, 2, None]
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48]])
    donor.eval(), llava.eval()
    with torch.no_grad():
        want = donor(input_ids=ids).logits
        got = llava(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert float(want.std()) > 0.1  # a real function, not a constant
    with torch.no_grad():  # opening an identity layer changes the function: the test can fail
        llava.model.language_model.layers[2].mlp.down_proj.weight.normal_(0, 0.5)
        assert not torch.allclose(llava(input_ids=ids).logits, want, atol=1e-3)


def test_transplant_refuses_a_mismatched_width(one_thread) -> None:
    from mmeff.zoo.lm_transplant import transplant_lm
    from mmeff.zoo.load import ZOO_MODELS
    from mmeff.zoo.processors import build_processor
    from mmeff.zoo.train_vlm import build_model

    qwen = build_model("tiny-qwen2-vl", build_processor(ZOO_MODELS["tiny-qwen2-vl"]), layers=1)
    llava = build_model("tiny-llava", build_processor(ZOO_MODELS["tiny-llava"]), layers=1, hidden=64)
    with pytest.raises(ValueError, match="embedding shapes differ"):
        transplant_lm(llava, qwen)
