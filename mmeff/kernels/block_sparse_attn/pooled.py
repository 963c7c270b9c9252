"""Per-block token statistics: the cheap torch path for pooled attention terms.

Rectified SpaAttn pools Q/K/V into block means for its selection, IPAR and GAPR terms, and
GAPR also needs the mean absolute deviation of each block around its mean. Both helpers
pool along dim -2 of ``x [..., S, D]`` into ``[..., ceil(S / block), D]``, accumulate in
float32 and return float32. A ragged last block, and tokens at or past ``valid_len``, are
left out of both the sums and the counts; a block with no valid token yields zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["block_abs_deviation", "block_mean"]


def _blocked(x: Tensor, block: int, valid_len: int | Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
    """Return ``x`` as ``[..., n, block, D]`` (zero-padded), a validity weight or None, and counts ``[..., n]``."""
    if x.dim() < 2:
        raise ValueError(f"x must be [..., S, D], got shape {tuple(x.shape)}")
    if not isinstance(block, int) or block <= 0:
        raise ValueError(f"block must be a positive int, got {block!r}")
    seq, dim = x.shape[-2], x.shape[-1]
    n = (seq + block - 1) // block
    pad = n * block - seq
    xp = F.pad(x, (0, 0, 0, pad)) if pad else x
    xb = xp.reshape(*x.shape[:-2], n, block, dim)
    pos = torch.arange(n * block, device=x.device).view(n, block)
    if valid_len is None:
        weight = None
        counts = (pos < seq).sum(-1).to(torch.float32)  # [n]; only the last block can be short
        counts = counts.expand(*x.shape[:-2], n)
        return xb, weight, counts
    if isinstance(valid_len, int):
        limit = torch.tensor(min(valid_len, seq), device=x.device)
    else:
        lead = x.shape[:-2]
        if valid_len.is_floating_point() or valid_len.shape != lead[: valid_len.dim()]:
            raise ValueError(
                "valid_len must be an int or an integer tensor whose shape is a prefix of "
                f"x.shape[:-2] = {tuple(lead)} (e.g. [B]), got {valid_len.dtype} {tuple(valid_len.shape)}"
            )
        limit = valid_len.to(x.device).clamp(max=seq)
        limit = limit.reshape(*limit.shape, *([1] * (len(lead) - limit.dim())))
    weight = pos < limit[..., None, None]  # [..., n, block]
    counts = weight.sum(-1).to(torch.float32).expand(*x.shape[:-2], n)
    return xb, weight, counts


def block_mean(x: Tensor, block: int, valid_len: int | Tensor | None = None) -> Tensor:
    """Mean of each block of ``block`` tokens along dim -2: ``[..., S, D] -> [..., n_blk, D]`` (float32)."""
    xb, weight, counts = _blocked(x, block, valid_len)
    if weight is not None:
        xb = torch.where(weight[..., None], xb, torch.zeros((), dtype=xb.dtype, device=xb.device))
    sums = xb.sum(dim=-2, dtype=torch.float32)
    return sums / counts.clamp_min(1.0)[..., None]


def block_abs_deviation(x: Tensor, block: int, valid_len: int | Tensor | None = None) -> Tensor:
    """Per-block mean of ``|x_r - block_mean|`` (a D-vector per block), ``[..., n_blk, D]`` float32.

    GAPR compares ``|q̄·k̄|`` with ``|Δq·k̄| + |q̄·Δk|`` where ``Δ`` is this statistic.
    """
    xb, weight, counts = _blocked(x, block, valid_len)
    mean = block_mean(x, block, valid_len)
    dev = (xb.to(torch.float32) - mean[..., None, :]).abs()
    if weight is None:
        # Zero-padded rows of a ragged last block must not count.
        seq = x.shape[-2]
        n, blk = xb.shape[-3], xb.shape[-2]
        weight = (torch.arange(n * blk, device=x.device).view(n, blk) < seq)
    dev = dev * weight[..., None].to(dev.dtype)
    return dev.sum(dim=-2) / counts.clamp_min(1.0)[..., None]
