"""Fused per-block mean and mean absolute deviation in one Triton pass.

Rectified SpaAttn needs, for Q and K of every head, the block means (pooled selection and
IPAR) and the mean ``|x - mean|`` per block (GAPR's error bound). The torch twins in
``pooled`` read the tensor twice (mean, then deviation) and materialise a float32 copy;
this kernel loads each ``[block, D]`` tile once into registers, reduces it in float32 and
writes both ``[n_blk, D]`` results. Same semantics as ``block_mean`` /
``block_abs_deviation`` without ``valid_len``: a ragged last block averages over its real
rows only. Any strides are accepted (e.g. ``[B, H, S, D]`` views of ``[B, S, H, D]``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._common import HAS_TRITON, tl, triton
from .pooled import block_abs_deviation, block_mean

__all__ = ["block_stats", "block_stats_naive", "block_stats_triton"]


def block_stats_naive(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Torch twin: ``(block_mean(x), block_abs_deviation(x))``, both float32 ``[..., n_blk, D]``."""
    return block_mean(x, block), block_abs_deviation(x, block)


if HAS_TRITON:

    @triton.jit
    def _block_stats_kernel(
        x_ptr, mean_ptr, dev_ptr,
        H, S, D, BLOCK,
        sxb, sxh, sxs, sxd,
        n_blk,
        ROWS: tl.constexpr, COLS: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        blk = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        rows = blk * BLOCK + tl.arange(0, ROWS)
        cols = tl.arange(0, COLS)
        row_ok = (tl.arange(0, ROWS) < BLOCK) & (rows < S)
        col_ok = cols < D
        ok = row_ok[:, None] & col_ok[None, :]
        ptrs = x_ptr + b * sxb + h * sxh + rows[:, None] * sxs + cols[None, :] * sxd
        tile = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        count = tl.maximum(tl.sum(row_ok.to(tl.float32), axis=0), 1.0)
        mean = tl.sum(tile, axis=0) / count
        dev = tl.where(ok, tl.abs(tile - mean[None, :]), 0.0)
        mad = tl.sum(dev, axis=0) / count
        out = (pid_bh * n_blk + blk) * D + cols
        tl.store(mean_ptr + out, mean, mask=col_ok)
        tl.store(dev_ptr + out, mad, mask=col_ok)


def block_stats_triton(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Triton path of :func:`block_stats` for ``x [B, H, S, D]``; float32 outputs ``[B, H, n_blk, D]``."""
    if not HAS_TRITON:
        raise RuntimeError("block_stats_triton needs the triton package; use block_stats_naive instead")
    if x.dim() != 4:
        raise ValueError(f"x must be [B, H, S, D], got shape {tuple(x.shape)}")
    if not isinstance(block, int) or block <= 0:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    bsz, heads, seq, dim = x.shape
    rows, cols = triton.next_power_of_2(block), triton.next_power_of_2(dim)
    if rows * cols > 65536:
        raise ValueError(
            f"block {block} x head dim {dim} is too large for one register tile (at most 65536 "
            "elements after rounding up to powers of two); use block_stats_naive or a smaller block"
        )
    n_blk = (seq + block - 1) // block
    mean = torch.empty(bsz, heads, n_blk, dim, device=x.device, dtype=torch.float32)
    dev = torch.empty_like(mean)
    if n_blk == 0 or bsz * heads == 0:
        return mean, dev
    grid = (bsz * heads, n_blk)
    _block_stats_kernel[grid](
        x, mean, dev, heads, seq, dim, block,
        *x.stride(), n_blk,
        ROWS=rows, COLS=cols,
    )
    return mean, dev


def block_stats(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Per-block ``(mean, mean |x - mean|)`` of ``x [B, H, S, D]`` along S, float32.

    Runs the fused Triton kernel where :func:`use_triton` says so (CUDA, or forced for the
    interpreter tests), the torch twin otherwise."""
    from . import use_triton

    return block_stats_triton(x, block) if use_triton(x) else block_stats_naive(x, block)
