"""Per-query chunk routing in plain torch: the ground truth and the CPU path.

VMoBA routes every query token to key chunks by its gate ``g[s, c] = q_s · k̄_c`` (float32,
unscaled; ``k̄_c`` the mean key of chunk ``c``) and always keeps the query's own chunk. Two
per-(head, query) rules are implemented here:

- **top-k**: the own chunk, then the ``topk - 1`` other chunks with the largest gates
  (ties: the lower chunk index first). Returned as an int32 index list ``[B, H, S, K]``,
  ``K = min(topk, n_chunks)``, own chunk in slot 0, the rest by descending gate.
- **threshold** (``threshold_type="query_head"`` in VMoBA's terms): min-max normalise the row
  (an all-equal row counts as all ones), ``remain = max(τ - ĝ_own / Σĝ, 0)``, then keep the
  shortest prefix of the other chunks, sorted by ``ĝ`` descending (ties: lower index first),
  whose cumulative share reaches ``remain``. Returned as a bool mask ``[B, H, S, n_chunks]``.

The stable sort makes ties deterministic, so this path, the Triton kernel and the loop
reference in ``mmeff.video.vmoba_core`` choose the same chunks even for degenerate rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gates_from_means", "route_threshold_rows", "route_topk_rows", "route_chunks_naive"]


def gates_from_means(q: Tensor, chunk_means: Tensor) -> Tensor:
    """Unscaled float32 gates ``[..., S, n_chunks]`` from ``q [..., S, D]`` and ``chunk_means [..., C, D]``."""
    return torch.matmul(q.float(), chunk_means.float().transpose(-1, -2))


def route_topk_rows(gates: Tensor, own_onehot: Tensor, topk: int) -> Tensor:
    """Top-k rows: int32 ``[..., K]`` with the own chunk first, then the others by descending gate."""
    n_chunks = gates.shape[-1]
    boosted = gates.float().masked_fill(own_onehot, float("inf"))
    order = boosted.sort(dim=-1, descending=True, stable=True).indices
    return order[..., : min(topk, n_chunks)].to(torch.int32)


def _minmax_rows(g: Tensor) -> Tensor:
    lo = g.amin(dim=-1, keepdim=True)
    rng = g.amax(dim=-1, keepdim=True) - lo
    ok = rng > 0
    return torch.where(ok, (g - lo) / torch.where(ok, rng, torch.ones_like(rng)), torch.ones_like(g))


def route_threshold_rows(gates: Tensor, own_onehot: Tensor, threshold: float) -> Tensor:
    """Threshold rows (cumulative normalised share ``τ``): bool ``[..., n_chunks]``, own chunk included."""
    gn = _minmax_rows(gates.float())
    total = gn.sum(-1)
    remain = (threshold - (gn * own_onehot).sum(-1) / total).clamp_min(0)
    others = gn.masked_fill(own_onehot, -1.0)  # the own chunk never competes
    vals, order = others.sort(dim=-1, descending=True, stable=True)
    before = F.pad(vals.clamp_min(0).cumsum(dim=-1)[..., :-1], (1, 0))  # share of the entries ahead
    take = (before / total.unsqueeze(-1) < remain.unsqueeze(-1)) & (vals >= 0)
    return torch.zeros_like(take).scatter_(-1, order, take) | own_onehot


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
