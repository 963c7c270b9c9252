"""Token-drop augmentation (mmeff.zoo.token_drop) is exactly mmeff's own cut, and its draws use no scores."""
from __future__ import annotations

import random

import pytest
import torch

import mmeff
from mmeff.zoo.token_drop import DropPlan, TokenDrop, TokenDropConfig, draw_plan
from tests.hosts.conftest import FixedKeepLLM, FixedKeepPre, build, inputs_for

KEPT = (0, 3, 5, 9)


@pytest.fixture(scope="module")
def models():
    return {f: build(f, "eager") for f in ("llava", "qwen2_vl")}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("layer", [0, 2])
def test_token_drop_equals_mmeff_cut(models, family, layer):
    """Masking the planned columns from layer K on gives the logits of mmeff's cut at K (K=0: pre-LLM)."""
    model = models[family]
    inputs = inputs_for(model, n=2)
    ids = inputs["input_ids"]
    image_id = model.config.image_token_id
    method = (FixedKeepPre(keep=len(KEPT), indices=KEPT) if layer == 0
              else FixedKeepLLM(keep=len(KEPT), layer=layer, indices=KEPT))
    with mmeff.apply(model, method), torch.no_grad():
        pruned = model(**inputs, use_cache=False).logits
    dropped = torch.zeros_like(ids, dtype=torch.bool)
    for b in range(ids.shape[0]):
        vis = (ids[b] == image_id).nonzero().squeeze(-1)
        keep = torch.zeros(vis.numel(), dtype=torch.bool)
        keep[list(KEPT)] = True
        dropped[b, vis[~keep]] = True
    hooks_before = sum(len(l.self_attn._forward_pre_hooks) for l in model.model.language_model.layers)
    drop = TokenDrop(model)
    try:
        drop.arm(DropPlan(dropped, [layer] * ids.shape[0]))
        with torch.no_grad():
            masked = model(**inputs, use_cache=False).logits
    finally:
        drop.remove()
    with torch.no_grad():
        dense = model(**inputs, use_cache=False).logits
    for b in range(ids.shape[0]):
        real = inputs["attention_mask"][b].bool() & ~dropped[b]
        torch.testing.assert_close(masked[b, real], pruned[b, -int(real.sum()):], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(masked, dense, atol=1e-3)  # the drop did something
    assert sum(len(l.self_attn._forward_pre_hooks) for l in model.model.language_model.layers) == hooks_before


def test_draw_plan_drops_only_image_tokens_at_random_budgets():
    image_id = 7
    ids = torch.tensor([[1, 2] + [image_id] * 100 + [3, 4]] * 64)
    cfg = TokenDropConfig(dense=0.25, pre_llm=0.5, min_keep=0.05, max_layer=3)
    plan = draw_plan(ids, image_id, n_layers=8, cfg=cfg, rng=random.Random(0))
    assert not bool(plan.dropped[:, :2].any()) and not bool(plan.dropped[:, -2:].any())
    kept = 100 - plan.dropped.sum(1)
    dense = [k == 8 for k in plan.layer]
    assert all(int(kept[i]) == 100 for i in range(64) if dense[i])
    drops = [int(kept[i]) for i in range(64) if not dense[i]]
    assert 8 <= len(drops) <= 60 and min(drops) >= 5 and len(set(drops)) > 10  # many different budgets
    layers = {k for k in plan.layer if k < 8}
    assert 0 in layers and layers <= {0, 1, 2, 3} and len(layers) > 2
    again = draw_plan(ids, image_id, n_layers=8, cfg=cfg, rng=random.Random(0))
    assert torch.equal(again.dropped, plan.dropped) and again.layer == plan.layer
    # a drop at layer K blocks nothing before K
    i = next(i for i, k in enumerate(plan.layer) if 0 < k < 8)
    assert not bool(plan.blocked_at(plan.layer[i] - 1)[i].any()) and bool(plan.blocked_at(plan.layer[i])[i].any())


def test_token_drop_config_rejects_bad_values():
    with pytest.raises(ValueError, match="min_keep"):
        TokenDropConfig(min_keep=0.0)
    with pytest.raises(ValueError, match="max_layer"):
        TokenDropConfig(max_layer=0)
