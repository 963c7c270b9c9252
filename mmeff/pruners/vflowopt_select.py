"""VFlowOpt's pre-LLM step: keep the most important tokens, recycle the least important ones per grid cell.

For one image of T tokens with importance I, spatial coordinates (row, col) and a region id (LLaVA-NeXT: the
base image and the packed crops are separate grids), keeping ``keep`` tokens:
1. ``reduce = T - keep`` tokens must go. When nothing goes, nothing is recycled (keep-all is exactly dense).
2. The ``reduce + int(T / m^2)`` lowest-I tokens form the pool (stable sort: ties keep their order).
3. Pool tokens are grouped by (region, floor(row / m), floor(col / m)). Each group becomes one token, the
   I-weighted mean of its members' features, written into the slot of the member with the highest I; that
   slot is kept. The other tokens outside the pool are kept as they are.
With ``count="released"`` the kept count is ``T - reduce - int(T/m^2) + groups``: it can exceed ``keep`` (by 15%
on a 12x12 grid with m < 3), which a budget comparison, and a calibration, would reward. The default
``count="exact"`` instead grows the pool from the bottom of the ranking until ``(T - pool) + groups == keep``
(possible whenever pooling every token gives at most ``keep`` cells; otherwise the ``keep`` cells with the most
important slots are kept and the others dropped). Weights are I / sum(I); a group whose importances do not sum
to a positive value (possible only with alpha_v < 0) is averaged uniformly instead of dividing by ~0.
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Recycle:
    """Merges of one image: group g's members (with weights) are averaged into slot ``slots[g]``."""

    slots: torch.Tensor    # [G] image-local token index receiving the merged feature
    members: torch.Tensor  # [M] image-local token indices
    group: torch.Tensor    # [M] group id of each member (0..G-1)
    weights: torch.Tensor  # [M] float32, summing to 1 within each group

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        """Features [T, D] with each slot replaced by its group's weighted mean (others unchanged)."""
        merged = torch.zeros(self.slots.numel(), features.shape[-1], dtype=torch.float32, device=features.device)
        contrib = features[self.members.to(features.device)].float() * self.weights.to(features.device)[:, None]
        merged.index_add_(0, self.group.to(features.device), contrib)
        out = features.clone()
        out[self.slots.to(features.device)] = merged.to(features.dtype)
        return out


def _cell_ids(coords: torch.Tensor, region: torch.Tensor, cell: float) -> torch.Tensor:
    """One integer id per token for its (region, row cell, col cell)."""
    cells = torch.stack([region.long(), torch.floor(coords[:, 0].float() / cell).long(),
                         torch.floor(coords[:, 1].float() / cell).long()], 1)
    return torch.unique(cells, dim=0, return_inverse=True)[1]


def exact_pool_size(cell_of_sorted: torch.Tensor, keep: int) -> int:
    """Smallest pool P (lowest-ranked tokens) with ``(T - P) + distinct cells among them == keep``, else T.

    kept(P) = T - P + cells(P) never rises and falls by at most 1 per token, so the first P where it reaches
    ``keep`` meets it exactly.
    """
    total = cell_of_sorted.numel()
    n_cells = int(cell_of_sorted.max()) + 1
    first = torch.full((n_cells,), total, dtype=torch.long, device=cell_of_sorted.device)
    first = first.scatter_reduce(0, cell_of_sorted, torch.arange(total, device=cell_of_sorted.device), "amin")
    new_cell = torch.zeros(total, dtype=torch.long, device=cell_of_sorted.device)
    new_cell[first] = 1
    sizes = torch.arange(1, total + 1, device=cell_of_sorted.device)
    kept = total - sizes + new_cell.cumsum(0)                      # kept(P) for P = 1..T
    hit = torch.nonzero(kept <= keep).flatten()
    return int(hit[0]) + 1 if hit.numel() else total


def prune_and_recycle(importance: torch.Tensor, coords: torch.Tensor, region: torch.Tensor, keep: int,
                      cell: float, count: str = "exact") -> tuple[torch.Tensor, Recycle | None]:
    """Sorted image-local indices kept, and the merges to apply to the features before gathering them.

    importance [T]; coords [T, 2] (row, col); region [T] ints; keep: tokens the budget allows; cell: m > 0;
    count: "exact" (kept == keep) or "released" (the released pool size).
    """
    total = importance.shape[0]
    reduce = total - keep
    if reduce <= 0:
        return torch.arange(total, device=importance.device), None
    if keep <= 0:
        return torch.zeros(0, dtype=torch.long, device=importance.device), None
    order = torch.sort(importance.float(), stable=True).indices
    cell_id = _cell_ids(coords, region, cell)
    if count == "released":
        pool_size = min(total, reduce + int(total / (cell * cell)))
    else:
        pool_size = exact_pool_size(cell_id[order], keep)
    pool = order[:pool_size]
    kept_mask = torch.ones(total, dtype=torch.bool, device=importance.device)
    kept_mask[pool] = False
    _, group = torch.unique(cell_id[pool], return_inverse=True)
    n_groups = int(group.max()) + 1 if pool.numel() else 0
    imp = importance[pool].float()
    # slot of each group: the member with the highest importance (first one on ties, in pool order)
    best = torch.full((n_groups,), float("-inf"), device=imp.device).scatter_reduce(0, group, imp, "amax")
    is_best = imp == best[group]
    first = torch.full((n_groups,), pool_size, dtype=torch.long, device=imp.device)
    first = first.scatter_reduce(0, group, torch.where(is_best, torch.arange(pool_size, device=imp.device), pool_size),
                                 "amin")
    slots = pool[first]
    if count != "released" and int((~kept_mask).sum()) == total and n_groups > keep:
        # more cells than the budget even with every token pooled: keep the cells with the most important slots
        top = torch.topk(imp[first], keep, sorted=False).indices
        chosen = torch.zeros(n_groups, dtype=torch.bool, device=imp.device)
        chosen[top] = True
        remap = torch.cumsum(chosen.long(), 0) - 1
        member = chosen[group]
        pool, group, imp = pool[member], remap[group[member]], imp[member]
        slots, n_groups = slots[chosen], keep
    kept_mask[slots] = True
    sums = torch.zeros(n_groups, device=imp.device).index_add_(0, group, imp)
    counts = torch.zeros(n_groups, device=imp.device).index_add_(0, group, torch.ones_like(imp))
    positive = sums[group] > 0
    weights = torch.where(positive, imp / sums[group].where(sums[group] > 0, torch.ones_like(sums[group])),
                          1.0 / counts[group])
    recycle = Recycle(slots=slots, members=pool, group=group, weights=weights)
    return torch.nonzero(kept_mask).flatten(), recycle
