"""VMoBA's per-query chunk routing (top-k and threshold), as a torch path and a fused Triton kernel.

``route_chunks`` runs the Triton kernel for CUDA tensors (or everywhere with
``MMEFF_FORCE_TRITON=1``, used with ``TRITON_INTERPRET=1`` on CPU) when the chunk count fits
its register tile, and the torch path otherwise. The torch path materialises the
``[B, H, S, n_chunks]`` gates and sorts every row; on an H100 that routing took longer than
dense attention itself at Wan 1.3B 480p (13 ms vs 11.5 ms, docs/results/gpu-2026-11-22), which
is what the fused kernel removes.
"""

from __future__ import annotations

import math
import os
from numbers import Real

from torch import Tensor

from .naive import gates_from_means, route_chunks_naive, route_threshold_rows, route_topk_rows
from .triton_kernel import HAS_TRITON, MAX_CHUNKS, route_chunks_triton

__all__ = [
    "MAX_CHUNKS",
    "check_route_args",
    "gates_from_means",
    "route_chunks",
    "route_chunks_naive",
    "route_chunks_triton",
    "route_threshold_rows",
    "route_topk_rows",
    "triton_routes",
]

ROUTE_MODES = ("topk", "threshold")


def check_route_args(q: Tensor, chunk_means: Tensor, query_chunk: Tensor, mode: str, topk: int,
                     threshold: float) -> None:
    """Shapes and settings of a routing call; ``ValueError`` naming the fix."""
    if mode not in ROUTE_MODES:
        raise ValueError(f"mode must be one of {ROUTE_MODES}, got {mode!r}")
    if q.dim() != 4 or chunk_means.dim() != 4:
        raise ValueError(
            f"q must be [B, H, S, D] and chunk_means [B, H, n_chunks, D], "
            f"got {tuple(q.shape)} and {tuple(chunk_means.shape)}"
        )
    if chunk_means.shape[:2] != q.shape[:2] or chunk_means.shape[3] != q.shape[3] or chunk_means.shape[2] == 0:
        raise ValueError(
            f"chunk_means must be [B={q.shape[0]}, H={q.shape[1]}, n_chunks >= 1, D={q.shape[3]}], "
            f"got {tuple(chunk_means.shape)}"
        )
    if query_chunk.dim() != 1 or query_chunk.numel() != q.shape[2] or query_chunk.is_floating_point():
        raise ValueError(f"query_chunk must be an int tensor [S={q.shape[2]}] (the chunk of every query)")
    if mode == "topk" and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise ValueError(f"topk must be an int >= 1 (chunks per query, own chunk included), got {topk!r}")
    if mode == "threshold" and (
        isinstance(threshold, bool) or not isinstance(threshold, Real) or not math.isfinite(threshold) or threshold < 0
    ):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")


def triton_routes(q: Tensor, n_chunks: int) -> bool:
    """True when ``route_chunks`` would run the Triton kernel for ``q`` and this chunk count."""
    if not HAS_TRITON or n_chunks > MAX_CHUNKS or q.shape[-1] < 16 or q.shape[-1] & (q.shape[-1] - 1):
        return False
    return q.is_cuda or os.environ.get("MMEFF_FORCE_TRITON", "") == "1"


def route_chunks(
    q: Tensor,
    chunk_means: Tensor,
    query_chunk: Tensor,
    *,
    mode: str,
    topk: int = 3,
    threshold: float = 0.25,
) -> Tensor:
    """Route every query to its chunks (see ``route_chunks_naive`` for the exact rules).

    Returns int32 ``[B, H, S, min(topk, n_chunks)]`` (own chunk first) for ``mode="topk"`` and
    bool ``[B, H, S, n_chunks]`` for ``mode="threshold"``.
    """
    check_route_args(q, chunk_means, query_chunk, mode, topk, threshold)
    fn = route_chunks_triton if triton_routes(q, chunk_means.shape[2]) else route_chunks_naive
    return fn(q, chunk_means, query_chunk, mode=mode, topk=topk, threshold=threshold)
