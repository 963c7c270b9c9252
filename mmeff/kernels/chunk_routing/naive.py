"""Per-query chunk routing in plain torch: the ground truth and the CPU path.

VMoBA routes every query token to key chunks by its gate ``g[s, c] = q_s · k̄_c`` (float32,
unscaled; ``k̄_c`` the mean key of chunk ``c``) and always keeps the query's own chunk. Two
per-(head, query) rules are implemented here:

- **top-k**: the own chunk, then the ``topk - 1`` other chunks with the largest gates
  (ties: the lower chunk index first). Returned as an int32 index list ``[B, H, S, K]``,
  ``K = min(topk, n_chunks)``, own chunk in slot 0, the rest by descending gate.
- **threshold** (``threshold_type="query_head"`` in VMoBA's terms), the official rule:
  min-max normalise the row, ``ĝ = (g - min) / (max - min)`` (a range ``<= EPS`` divides by 1
  instead), ``T = Σĝ + EPS``, ``remain = max(τ - ĝ_own / T, 0)``. Rank every chunk by ``ĝ``
  descending with the own chunk competing at 0 (ties: lower index first) and keep the ranked
  entries up to and including the first whose cumulative share ``cumsum / T`` reaches
  ``remain`` (all of them when none does). So the first-ranked entry, the best other chunk,
  is always kept, even when the own chunk alone reaches ``τ``. Returned as a bool mask
  ``[B, H, S, n_chunks]`` with the own chunk added.

``EPS = 1e-6`` is the official guard; it also makes ``τ >= 1`` keep every chunk. The ranking
is the official code's ``torch.sort`` made stable, so this path, the Triton kernel and the loop
reference in ``mmeff.video.vmoba_core`` choose the same chunks even for degenerate rows (the
official sort leaves ties in an unspecified order on CUDA; ties only matter when every other
chunk sits at the row minimum, ``ĝ = 0``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["EPS", "gates_from_means", "minmax_normalise", "ranked_prefix", "route_chunks_naive", "route_threshold_rows", "route_topk_rows"]

EPS = 1e-6  # official VMoBA's guard on the min-max range and on the row total


def gates_from_means(q: Tensor, chunk_means: Tensor) -> Tensor:
    """Unscaled float32 gates ``[..., S, n_chunks]`` from ``q [..., S, D]`` and ``chunk_means [..., C, D]``."""
    return torch.matmul(q.float(), chunk_means.float().transpose(-1, -2))


def route_topk_rows(gates: Tensor, own_onehot: Tensor, topk: int) -> Tensor:
    """Top-k rows: int32 ``[..., K]`` with the own chunk first, then the others by descending gate."""
    n_chunks = gates.shape[-1]
    boosted = gates.float().masked_fill(own_onehot, float("inf"))
    order = boosted.sort(dim=-1, descending=True, stable=True).indices
    return order[..., : min(topk, n_chunks)].to(torch.int32)


def minmax_normalise(g: Tensor, dims: int | tuple[int, ...] = -1) -> Tensor:
    """Official VMoBA min-max normalisation over ``dims``; a range ``<= EPS`` divides by 1."""
    lo = g.amin(dim=dims, keepdim=True)
    rng = g.amax(dim=dims, keepdim=True) - lo
    return (g - lo) / torch.where(rng <= EPS, torch.ones_like(rng), rng)


def ranked_prefix(competitors: Tensor, total: Tensor, remain: Tensor) -> Tensor:
    """Bool mask (shape of ``competitors``) of the official cumulative-share prefix over the last dim.

    Entries are ranked by value, descending (stable: ties keep index order); entry ``j`` of
    the ranking is kept when it is the first or when the entries ranked ahead of it have a
    share ``cumsum / total`` still below ``remain``, i.e. up to and including the first entry
    whose cumulative share reaches ``remain``. ``total`` and ``remain`` have the shape of
    ``competitors`` without its last dim; ``competitors`` must be ``>= 0``.
    """
    vals, order = competitors.sort(dim=-1, descending=True, stable=True)
    before = F.pad(vals.cumsum(dim=-1)[..., :-1], (1, 0))  # mass ranked ahead of each entry
    take = before / total.unsqueeze(-1) < remain.unsqueeze(-1)
    take[..., 0] = True  # official: the cut-off index is >= 0, so the first-ranked entry always stays
    return torch.zeros_like(take).scatter_(-1, order, take)


def route_threshold_rows(gates: Tensor, own_onehot: Tensor, threshold: float) -> Tensor:
    """Threshold rows (cumulative normalised share ``τ``): bool ``[..., n_chunks]``, own chunk included."""
    gn = minmax_normalise(gates.float())
    total = gn.sum(-1) + EPS
    remain = (threshold - (gn * own_onehot).sum(-1) / total).clamp_min(0)
    competitors = gn.masked_fill(own_onehot, 0.0)  # the own chunk competes at 0, as in the official code
    return ranked_prefix(competitors, total, remain) | own_onehot


def route_chunks_naive(
    q: Tensor,
    chunk_means: Tensor,
    query_chunk: Tensor,
    *,
    mode: str,
    topk: int = 3,
    threshold: float = 0.25,
) -> Tensor:
    """Route every query of ``q [B, H, S, D]`` over ``chunk_means [B, H, C, D]``.

    ``query_chunk [S]`` is the chunk holding each query. ``mode="topk"`` returns int32
    ``[B, H, S, min(topk, C)]``; ``mode="threshold"`` returns bool ``[B, H, S, C]``.
    """
    n_chunks = chunk_means.shape[2]
    own = F.one_hot(query_chunk.long(), n_chunks).bool()  # [S, C], broadcast over B, H
    gates = gates_from_means(q, chunk_means)
    if mode == "topk":
        return route_topk_rows(gates, own, topk)
    return route_threshold_rows(gates, own, threshold)
