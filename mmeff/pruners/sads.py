"""Sensitivity-aware diverse selection (SADS) of ZOO-Prune, on the projected features of one image.

With ``S_hat`` the min-max normalised sensitivity and ``D = 1 - cos`` between projected features: the
first pick is ``argmax S_hat``; each next pick is ``argmax_i S_hat_i * min_{p picked} D_{i,p}`` over the
tokens not picked yet. Kept as a running minimum, so the cost is O(N k) and no N x N matrix exists.
"""
from __future__ import annotations

import torch


def minmax(scores: torch.Tensor) -> torch.Tensor:
    """Scores scaled to [0, 1]; all ones when they are all equal (the official division would give NaN)."""
    lo, hi = scores.min(), scores.max()
    if bool(hi - lo <= 0):
        return torch.ones_like(scores)
    return (scores - lo) / (hi - lo)


def sads_select(sensitivity: torch.Tensor, features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (in pick order) of ``k`` tokens chosen greedily to be sensitive and mutually diverse."""
    n = sensitivity.shape[0]
    k = min(int(k), n)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=sensitivity.device)
    s_hat = minmax(sensitivity.double())
    z = torch.nn.functional.normalize(features.double(), dim=-1)
    picked = torch.zeros(n, dtype=torch.bool, device=sensitivity.device)
    first = int(torch.argmax(s_hat))
    order = [first]
    picked[first] = True
    min_dist = 1.0 - z @ z[first]
    for _ in range(k - 1):
        gain = (s_hat * min_dist).masked_fill(picked, -float("inf"))
        nxt = int(torch.argmax(gain))
        order.append(nxt)
        picked[nxt] = True
        min_dist = torch.minimum(min_dist, 1.0 - z @ z[nxt])
    return torch.tensor(order, dtype=torch.long, device=sensitivity.device)
