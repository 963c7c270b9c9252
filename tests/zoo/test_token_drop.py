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
        drop.arm(DropPlan.single(dropped, [layer] * ids.shape[0]))
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


def _first_layer(plan: DropPlan, i: int, n_layers: int) -> int:
    """The layer of sample i's first cut (n_layers when nothing is dropped)."""
    return min(n_layers, int(plan.from_layer[i].min()))


def test_draw_plan_drops_only_image_tokens_at_random_budgets():
    image_id = 7
    ids = torch.tensor([[1, 2] + [image_id] * 100 + [3, 4]] * 64)
    cfg = TokenDropConfig(dense=0.25, pre_llm=0.5, min_keep=0.05, max_layer=3, patterns=(1, 0, 0), chain=0.0)
    plan = draw_plan(ids, image_id, n_layers=8, cfg=cfg, rng=random.Random(0))
    assert not bool(plan.dropped[:, :2].any()) and not bool(plan.dropped[:, -2:].any())
    kept = 100 - plan.dropped.sum(1)
    layer = [_first_layer(plan, i, 8) for i in range(64)]
    dense = [k == 8 for k in layer]
    assert all(int(kept[i]) == 100 for i in range(64) if dense[i])
    drops = [int(kept[i]) for i in range(64) if not dense[i]]
    assert 8 <= len(drops) <= 60 and min(drops) >= 5 and len(set(drops)) > 10  # many different budgets
    layers = {k for k in layer if k < 8}
    assert 0 in layers and layers <= {0, 1, 2, 3} and len(layers) > 2
    again = draw_plan(ids, image_id, n_layers=8, cfg=cfg, rng=random.Random(0))
    assert torch.equal(again.from_layer, plan.from_layer)
    # one cut per sample without chains; a drop at layer K blocks nothing before K
    for i in range(64):
        if not dense[i]:
            assert set(plan.from_layer[i][plan.dropped[i]].tolist()) == {layer[i]}
    i = next(i for i, k in enumerate(layer) if 0 < k < 8)
    assert not bool(plan.blocked_at(layer[i] - 1)[i].any()) and bool(plan.blocked_at(layer[i])[i].any())


def _kept_sets(pattern: tuple[float, float, float], objects: torch.Tensor | None = None, n: int = 200):
    image_id = 7
    ids = torch.tensor([[1] + [image_id] * 64 + [3]] * n)
    cfg = TokenDropConfig(dense=0.0, pre_llm=1.0, min_keep=0.05, patterns=pattern, chain=0.0)
    plan = draw_plan(ids, image_id, n_layers=4, cfg=cfg, rng=random.Random(1),
                     objects=None if objects is None else objects.expand(n, 64))
    return ~plan.dropped[:, 1:65]


def _neighbour_share(kept: torch.Tensor) -> float:
    """Share of kept tokens (8x8 grid) with a kept 4-neighbour, over samples that keep 2..16 tokens."""
    grid = kept.reshape(-1, 8, 8).float()
    pad = torch.nn.functional.pad(grid, (1, 1, 1, 1))
    nb = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]
    rows = (grid.sum((1, 2)) >= 2) & (grid.sum((1, 2)) <= 16)
    return float(((nb > 0) & (grid > 0))[rows].sum() / grid[rows].sum())


def test_block_pattern_keeps_clustered_tokens_uniform_scatters_them():
    uniform, blocks = _kept_sets((1, 0, 0)), _kept_sets((0, 1, 0))
    assert (uniform.sum(1) == blocks.sum(1)).float().mean() < 1  # different draws, same budgets distribution
    assert _neighbour_share(blocks) > _neighbour_share(uniform) + 0.2


def test_object_pattern_keeps_object_tokens_first():
    on = torch.zeros(64, dtype=torch.bool)
    on[[9, 10, 17, 18, 40, 41]] = True
    kept = _kept_sets((0, 0, 1), objects=on)
    budgets = kept.sum(1)
    big = budgets >= 6
    assert bool(big.any()) and bool((~big).any())
    assert bool(kept[big][:, on].all())                        # a budget >= the objects keeps all of them
    assert bool((kept[~big] & ~on).sum() == 0)                 # a smaller budget keeps object tokens only
    uniform = _kept_sets((1, 0, 0))
    assert float(uniform[:, on].float().mean()) < float(kept[:, on].float().mean()) - 0.3
    with pytest.raises(ValueError, match="object labels"):
        _kept_sets((0, 0, 1))


def test_chain_thins_the_survivors_at_a_later_layer():
    image_id = 7
    ids = torch.tensor([[1] + [image_id] * 64 + [3]] * 100)
    cfg = TokenDropConfig(dense=0.0, pre_llm=0.5, max_layer=2, patterns=(1, 1, 0), chain=1.0)
    plan = draw_plan(ids, image_id, n_layers=6, cfg=cfg, rng=random.Random(2))
    chained = 0
    for i in range(100):
        layers = sorted(set(plan.from_layer[i][plan.dropped[i]].tolist()))
        assert 1 <= len(layers) <= 2 and layers[0] <= 2
        if len(layers) == 2:
            chained += 1
            first, second = layers
            kept_first = int((~plan.blocked_at(first)[i, 1:65]).sum())
            kept_second = int((~plan.blocked_at(second)[i, 1:65]).sum())
            assert second > first and 1 <= kept_second < kept_first
    assert chained > 50


def test_token_drop_config_rejects_bad_values():
    with pytest.raises(ValueError, match="min_keep"):
        TokenDropConfig(min_keep=0.0)
    with pytest.raises(ValueError, match="max_layer"):
        TokenDropConfig(max_layer=0)
    with pytest.raises(ValueError, match="patterns"):
        TokenDropConfig(patterns=(0, 0, 0))
    with pytest.raises(ValueError, match="chain"):
        TokenDropConfig(chain=1.5)
