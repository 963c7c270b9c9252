"""Pieces every attention kernel shares: the optional Triton import and the q/k/v input checks."""
from __future__ import annotations

from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional
    triton = None
    tl = None
    HAS_TRITON = False


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
