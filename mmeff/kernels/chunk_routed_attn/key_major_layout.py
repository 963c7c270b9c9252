"""Host-side layout for key-major chunk-routed attention (torch only, no device read-back).

Query-major kernels give each query tile the *union* of the chunks its rows picked; with
per-token routing that union is 4-6x larger than what any row needs (docs/results/
gpu-2026-11-22). Key-major work turns it around: every (query, chosen chunk) pair becomes one
row of a list sorted by chunk, so a tile holds queries that all chose the *same* chunk and
reads exactly that chunk's keys. This module builds that list from an index-list selection
``idx [B, H, S, K]`` (``-1`` = empty slot, chunks distinct within a row):

- ``pair_query [P]`` (int32): the query of each pair, pairs grouped by (b, h, chunk) and
  ascending in query inside a group (stable sort), empty slots last;
- ``group_start [G + 1]`` (int32): where each (b, h, chunk) group starts, ``G = B*H*(C+1)``
  (the extra chunk column holds the empty slots, which no tile visits);
- ``tile_group [T_max]`` / ``tile_first [T_max]`` (int32): for every possible tile, its group
  and first pair. ``T_max`` is an upper bound known on the host, so the kernel grid needs no
  read-back; tiles past the real count get group ``G`` and exit at once;
- ``pair_of_slot [B, H, S, K]`` (int32): where each (query, slot) pair landed, for the merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["KeyMajorLayout", "key_major_layout"]


@dataclass(frozen=True)
class KeyMajorLayout:
    """Pairs sorted by chunk and the tile table over them (see the module docstring)."""

    pair_query: Tensor
    group_start: Tensor
    tile_group: Tensor
    tile_first: Tensor
    pair_of_slot: Tensor
    n_groups: int
    block_m: int

    @property
    def n_pairs(self) -> int:
        return int(self.pair_query.numel())


def key_major_layout(idx: Tensor, n_chunks: int, block_m: int) -> KeyMajorLayout:
    """Sort the (query, chunk) pairs of ``idx [B, H, S, K]`` by chunk and tile every chunk's queries."""
    bsz, heads, seq, slots = idx.shape
    dev = idx.device
    n_groups = bsz * heads * (n_chunks + 1)
    chunk = torch.where(idx < 0, n_chunks, idx.long())  # empty slots go to the spare column
    bh = torch.arange(bsz * heads, device=dev).view(bsz, heads, 1, 1)
    group = (bh * (n_chunks + 1) + chunk).flatten()  # [P], pairs in (b, h, s, slot) order
    order = torch.sort(group, stable=True).indices  # stable: queries ascend inside a group
    pair_query = (order // slots % seq).to(torch.int32)
    pair_of_slot = torch.empty_like(order)
    pair_of_slot[order] = torch.arange(order.numel(), device=dev)

    counts = torch.zeros(n_groups, dtype=torch.long, device=dev).scatter_add_(0, group, torch.ones_like(group))
    group_start = torch.zeros(n_groups + 1, dtype=torch.long, device=dev)
    group_start[1:] = counts.cumsum(0)
    tiles = -(-counts // block_m)
    tiles.view(bsz * heads, n_chunks + 1)[:, n_chunks] = 0  # the empty-slot column gets no tile
    tile_end = tiles.cumsum(0)
    # Upper bound on tiles: per (b, h), ceil(S*K / block_m) + n_chunks (one partial tile per chunk).
    t_max = max(1, bsz * heads * (-(-(seq * slots) // block_m) + n_chunks))
    t = torch.arange(t_max, device=dev)
    tile_group = torch.searchsorted(tile_end, t, right=True)  # == n_groups past the last real tile
    safe = tile_group.clamp_max(n_groups - 1)
    tile_first = group_start[safe] + (t - (tile_end[safe] - tiles[safe])) * block_m
    return KeyMajorLayout(
        pair_query=pair_query,
        group_start=group_start.to(torch.int32),
        tile_group=tile_group.to(torch.int32),
        tile_first=tile_first.to(torch.int32),
        pair_of_slot=pair_of_slot.view(bsz, heads, seq, slots).to(torch.int32),
        n_groups=n_groups,
        block_m=block_m,
    )
