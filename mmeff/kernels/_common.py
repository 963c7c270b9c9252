"""Pieces every attention kernel shares: the optional Triton import and the q/k/v input checks."""
from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional
    triton = None
    tl = None
    HAS_TRITON = False


# Shared memory one H100 block may use (Triton reports 232,448 bytes there); stay a little below it.
_SMEM_BUDGET = 224 * 1024


def default_num_stages(block_m: int, block_n: int, head_dim: int, element_size: int) -> int:
    """Pipeline depth for the attention kernels: the deepest of 3, 2, 1 whose tiles fit in shared memory.

    Each stage buffers one K and one V tile; the Q tile stays resident. On an H100 (bf16, 128-row
    tiles, d=128) three stages ran 1.2x faster than two and four did not fit (benchmarks/, tune).
    """
    for stages in (3, 2):
        if element_size * head_dim * (block_m + 2 * stages * block_n) <= _SMEM_BUDGET:
            return stages
    return 1


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """q, k, v must be 4-D [B, H, S, D] float tensors of one dtype and device, with k.shape == v.shape."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"{name} must be a 4-D tensor [B, H, S, D] (heads before sequence; use "
                f".transpose(1, 2) on a [B, S, H, D] tensor), got {shape}"
            )
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_HEAD_DIMS = (16, 32, 64, 128)
TRITON_BLOCKS = (16, 32, 64, 128)


def check_triton_launch(dtype: torch.dtype, head_dim: int, block_m: int, block_n: int, naive: str) -> None:
    """What every attention Triton kernel here takes (dtype, head dim, tiles); ``ValueError`` naming the fix
    (``naive``: the torch twin to fall back to)."""
    if dtype not in TRITON_DTYPES:
        raise ValueError(f"the Triton path supports float16, bfloat16 and float32 inputs, got {dtype}")
    if head_dim not in TRITON_HEAD_DIMS:
        raise ValueError(
            f"the Triton path supports head dims {TRITON_HEAD_DIMS}, got {head_dim}; "
            "zero-pad q/k/v along the last dim to the next supported size (and pass the original "
            f"scale explicitly), or use {naive}"
        )
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk not in TRITON_BLOCKS:
            raise ValueError(f"the Triton path supports {name} in {TRITON_BLOCKS}, got {blk!r}")
