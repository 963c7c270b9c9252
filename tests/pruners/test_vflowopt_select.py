"""VFlowOpt's prune + recycle on synthetic maps: exact counts, the too-many-cells fallback, merge weights."""
from __future__ import annotations

import math

import pytest
import torch

from mmeff.pruners.vflowopt_select import prune_and_recycle


def _grid(side: int) -> torch.Tensor:
    i = torch.arange(side * side)
    return torch.stack([i // side, i % side], 1)


@pytest.mark.parametrize("side,keep,cell", [(12, 32, 2.5), (12, 32, 3.0), (24, 64, 7.3), (24, 200, 11.0), (5, 9, 1.5)])
def test_exact_count_meets_the_budget_and_matches_a_plain_loop(side, keep, cell):
    gen = torch.Generator().manual_seed(side * 1000 + keep)
    imp = torch.rand(side * side, generator=gen)
    coords, region = _grid(side), torch.zeros(side * side, dtype=torch.long)
    kept, recycle = prune_and_recycle(imp, coords, region, keep, cell)
    assert kept.numel() == keep
    ranked = torch.sort(imp, stable=True).indices.tolist()
    size = side * side - keep
    cells = lambda idx: {(math.floor(coords[i, 0] / cell), math.floor(coords[i, 1] / cell)) for i in idx}
    while side * side - size + len(cells(ranked[:size])) > keep:
        size += 1
    assert sorted(recycle.members.tolist()) == sorted(ranked[:size])
    assert sorted(set(kept.tolist()) - set(ranked[:size])) == sorted(ranked[size:])


def test_more_cells_than_budget_keeps_the_most_important_cells():
    imp = torch.rand(16, generator=torch.Generator().manual_seed(0))
    kept, recycle = prune_and_recycle(imp, _grid(4), torch.zeros(16, dtype=torch.long), 4, 1.0)  # 16 one-token cells
    assert kept.tolist() == sorted(torch.topk(imp, 4).indices.tolist())
    feats = torch.randn(16, 3)
    assert torch.equal(recycle.apply(feats)[kept], feats[kept])  # one-token groups merge to themselves


def test_merge_is_the_importance_weighted_mean_in_the_best_slot():
    imp = torch.tensor([0.9, 0.1, 0.3, 0.8])  # a 2x2 image, one cell, keep 1 of 4
    kept, recycle = prune_and_recycle(imp, _grid(2), torch.zeros(4, dtype=torch.long), 1, 2.0)
    feats = torch.eye(4)
    assert kept.tolist() == [0]
    torch.testing.assert_close(recycle.apply(feats)[0], imp / imp.sum())
    assert prune_and_recycle(imp, _grid(2), torch.zeros(4, dtype=torch.long), 4, 2.0)[1] is None  # keep-all
