"""VFlowOpt's pre-LLM step: keep the most important tokens, recycle the least important ones per grid cell.

For one image of T tokens with importance I, spatial coordinates (row, col) and a region id (LLaVA-NeXT: the
base image and the packed crops are separate grids), keeping ``keep`` tokens:
1. ``reduce = T - keep`` tokens must go. When nothing goes, nothing is recycled (keep-all is exactly dense).
2. The ``reduce + int(T / m^2)`` lowest-I tokens form the pool (stable sort: ties keep their order).
3. Pool tokens are grouped by (region, floor(row / m), floor(col / m)). Each group becomes one token, the
   I-weighted mean of its members' features, written into the slot of the member with the highest I; that
   slot is kept. The other tokens outside the pool are kept as they are.
The kept count is therefore ``T - reduce - int(T/m^2) + groups`` (the released rule; it can differ from
``keep`` by a few tokens). Weights are I / sum(I); a group whose importances do not sum to a positive value
(possible only with alpha_v < 0) is averaged uniformly instead of dividing by ~0.
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


def prune_and_recycle(importance: torch.Tensor, coords: torch.Tensor, region: torch.Tensor, keep: int,
                      cell: float) -> tuple[torch.Tensor, Recycle | None]:
    """Sorted image-local indices kept, and the merges to apply to the features before gathering them.

    importance [T]; coords [T, 2] (row, col); region [T] ints; keep: tokens the budget allows; cell: m > 0.
    """
    total = importance.shape[0]
    reduce = total - keep
    if reduce <= 0:
        return torch.arange(total, device=importance.device), None
    pool_size = min(total, reduce + int(total / (cell * cell)))
    order = torch.sort(importance.float(), stable=True).indices
    pool = order[:pool_size]
    kept_mask = torch.ones(total, dtype=torch.bool, device=importance.device)
    kept_mask[pool] = False
    cells = torch.stack([region[pool].long(), torch.floor(coords[pool, 0].float() / cell).long(),
                         torch.floor(coords[pool, 1].float() / cell).long()], 1)
    _, group = torch.unique(cells, dim=0, return_inverse=True)
    n_groups = int(group.max()) + 1 if pool.numel() else 0
    imp = importance[pool].float()
    # slot of each group: the member with the highest importance (first one on ties, in pool order)
    best = torch.full((n_groups,), float("-inf"), device=imp.device).scatter_reduce(0, group, imp, "amax")
    is_best = imp == best[group]
    first = torch.full((n_groups,), pool_size, dtype=torch.long, device=imp.device)
    first = first.scatter_reduce(0, group, torch.where(is_best, torch.arange(pool_size, device=imp.device), pool_size),
                                 "amin")
    slots = pool[first]
    kept_mask[slots] = True
    sums = torch.zeros(n_groups, device=imp.device).index_add_(0, group, imp)
    counts = torch.zeros(n_groups, device=imp.device).index_add_(0, group, torch.ones_like(imp))
    positive = sums[group] > 0
    weights = torch.where(positive, imp / sums[group].where(sums[group] > 0, torch.ones_like(sums[group])),
                          1.0 / counts[group])
    recycle = Recycle(slots=slots, members=pool, group=group, weights=weights)
    return torch.nonzero(kept_mask).flatten(), recycle
