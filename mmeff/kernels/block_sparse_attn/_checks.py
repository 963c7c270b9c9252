"""Input validation shared by the naive and Triton block-sparse attention paths."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .layout import check_block_indices, num_blocks
from .._common import check_qkv


@dataclass(frozen=True)
class Problem:
    """Sizes of one validated call."""

    batch: int
    heads: int
    seq_q: int
    seq_kv: int
    head_dim: int
    n_qblk: int
    n_kblk: int
    scale: float


def check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_block_idx: Tensor,
    kv_block_count: Tensor,
    *,
    block_m: int,
    block_n: int,
    scale: float | None,
    kv_len: Tensor | None,
    row_scale: Tensor | None,
    row_add: Tensor | None,
    check_values: bool,
) -> Problem:
    """Check shapes, dtypes and devices; raise ``ValueError`` naming the fix."""
    check_qkv(q, k, v)
    batch, heads, seq_q, head_dim = q.shape
    if k.shape[0] != batch or k.shape[1] != heads or k.shape[3] != head_dim:
        raise ValueError(
            f"k/v must be [B={batch}, H={heads}, S_kv, D={head_dim}] to match q, got {tuple(k.shape)}"
        )
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if not isinstance(blk, int) or isinstance(blk, bool) or blk <= 0:
            raise ValueError(f"{name} must be a positive int, got {blk!r}")
    seq_kv = k.shape[2]
    n_qblk, n_kblk = num_blocks(seq_q, block_m), num_blocks(seq_kv, block_n)
    if kv_block_idx.device != q.device or kv_block_count.device != q.device:
        raise ValueError("kv_block_idx and kv_block_count must be on the same device as q")
    check_block_indices(
        kv_block_idx,
        kv_block_count,
        n_kblk=n_kblk,
        batch=batch,
        heads=heads,
        n_qblk=n_qblk,
        check_values=check_values,
    )
    if kv_len is not None:
        if kv_len.shape != (batch,) or kv_len.is_floating_point() or kv_len.dtype == torch.bool:
            raise ValueError(
                f"kv_len must be an integer tensor of shape [B={batch}] (valid keys per batch item), "
                f"got {kv_len.dtype} {tuple(kv_len.shape)}"
            )
        if kv_len.device != q.device:
            raise ValueError("kv_len must be on the same device as q")
    if row_scale is not None:
        if row_scale.shape != (batch, heads, n_qblk) or not row_scale.is_floating_point():
            raise ValueError(
                f"row_scale must be a float tensor [B, H, n_qblk] = {(batch, heads, n_qblk)}, "
                f"got {row_scale.dtype} {tuple(row_scale.shape)}"
            )
        if row_scale.device != q.device:
            raise ValueError("row_scale must be on the same device as q")
    if row_add is not None:
        if row_add.shape != (batch, heads, n_qblk, head_dim) or not row_add.is_floating_point():
            raise ValueError(
                f"row_add must be a float tensor [B, H, n_qblk, D] = {(batch, heads, n_qblk, head_dim)}, "
                f"got {row_add.dtype} {tuple(row_add.shape)}"
            )
        if row_add.device != q.device:
            raise ValueError("row_add must be on the same device as q")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    return Problem(batch, heads, seq_q, seq_kv, head_dim, n_qblk, n_kblk, float(scale))
