"""Chunk-routed attention: every query row attends to the key chunks it selected (forward only).

This is VMoBA's attention primitive (MoBA-style routing per query token over variable-length
key chunks). ``chunk_routed_attention`` runs the Triton kernel for CUDA tensors (or everywhere
when ``MMEFF_FORCE_TRITON=1``, used with ``TRITON_INTERPRET=1`` on CPU) and the torch
reference otherwise. Both return ``(out, lse)`` so partial results can be merged by LSE.

Layout choice:

- ``chunk_start`` (int, ``[n_chunks + 1]``, 0 .. S_kv): key chunk ``c`` is
  ``[chunk_start[c], chunk_start[c+1])``. Chunks may have any length, so VMoBA's ragged last
  chunk needs no padding.
- ``selected``: canonically a **bool mask** ``[B, H, Sq, n_chunks]``. The kernel needs, for
  every chunk visited by a query tile, each row's own membership bit; with a mask that is one
  byte load per (row, chunk), with a padded index list it would be a search per row. VMoBA's
  threshold selection produces a variable number of chunks per row, which is also naturally
  a mask. An int index list ``[B, H, Sq, max_sel]`` padded with ``-1`` is accepted as well and
  converted (``chunk_mask_from_indices``). The mask costs ``B*H*Sq*n_chunks`` bytes (about
  116 MiB per sample for Wan 1.3B 480p 3-D layers: 12 heads x 31 200 tokens x 325 chunks).
"""

from __future__ import annotations

import os

from torch import Tensor

from ._checks import chunk_mask_from_indices
from .naive import chunk_routed_attention_naive, key_chunk_index
from .triton_kernel import HAS_TRITON, chunk_routed_attention_triton, tile_union

__all__ = [
    "HAS_TRITON",
    "chunk_mask_from_indices",
    "chunk_routed_attention",
    "chunk_routed_attention_naive",
    "chunk_routed_attention_triton",
    "key_chunk_index",
    "tile_union",
    "use_triton",
]


def use_triton(q: Tensor) -> bool:
    """True when ``chunk_routed_attention`` would run the Triton kernel for ``q``."""
    if not HAS_TRITON:
        return False
    return q.is_cuda or os.environ.get("MMEFF_FORCE_TRITON", "") == "1"


def chunk_routed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    chunk_start: Tensor,
    selected: Tensor,
    *,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunk-routed attention; returns ``(out [B,H,Sq,D] in q.dtype, lse [B,H,Sq] float32)``.

    See ``chunk_routed_attention_naive`` for the exact semantics (both paths share them).
    """
    fn = chunk_routed_attention_triton if use_triton(q) else chunk_routed_attention_naive
    return fn(q, k, v, chunk_start, selected, scale=scale)
