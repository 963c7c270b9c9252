"""Block-sparse attention over per-query-block lists of key blocks (forward only).

``block_sparse_attention`` picks the Triton kernel for CUDA tensors (or everywhere when
``MMEFF_FORCE_TRITON=1``, used with ``TRITON_INTERPRET=1`` on CPU) and the torch reference
otherwise. See ``layout`` for the ``(kv_block_idx, kv_block_count)`` representation and
``pooled`` for the block-mean statistics used by Rectified SpaAttn's pooled terms
(``block_stats``: both statistics in one fused Triton pass on the GPU).
"""

from __future__ import annotations

import os

from torch import Tensor

from .layout import (
    check_block_indices,
    full_block_indices,
    indices_to_mask,
    mask_to_indices,
    num_blocks,
)
from .naive import block_sparse_attention_naive
from .pooled import block_abs_deviation, block_mean
from .pooled_triton import block_stats, block_stats_naive, block_stats_triton
from .triton_kernel import HAS_TRITON, block_sparse_attention_triton

__all__ = [
    "HAS_TRITON",
    "block_abs_deviation",
    "block_mean",
    "block_sparse_attention",
    "block_sparse_attention_naive",
    "block_sparse_attention_triton",
    "block_stats",
    "block_stats_naive",
    "block_stats_triton",
    "check_block_indices",
    "full_block_indices",
    "indices_to_mask",
    "mask_to_indices",
    "num_blocks",
    "use_triton",
]


def use_triton(q: Tensor) -> bool:
    """True when ``block_sparse_attention`` would run the Triton kernel for ``q``."""
    if not HAS_TRITON:
        return False
    return q.is_cuda or os.environ.get("MMEFF_FORCE_TRITON", "") == "1"


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_block_idx: Tensor,
    kv_block_count: Tensor,
    *,
    block_m: int,
    block_n: int,
    scale: float | None = None,
    kv_len: Tensor | None = None,
    row_scale: Tensor | None = None,
    row_add: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Block-sparse attention; returns ``(out [B,H,Sq,D] in q.dtype, lse [B,H,Sq] float32)``.

    See ``block_sparse_attention_naive`` for the exact semantics (both paths share them).
    """
    fn = block_sparse_attention_triton if use_triton(q) else block_sparse_attention_naive
    return fn(
        q, k, v, kv_block_idx, kv_block_count,
        block_m=block_m, block_n=block_n, scale=scale,
        kv_len=kv_len, row_scale=row_scale, row_add=row_add,
    )
