"""Input validation and the selection layouts shared by the naive and Triton chunk-routed paths."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._common import check_qkv

__all__ = ["Problem", "check_index_inputs", "check_inputs", "chunk_mask_from_indices", "normalise_selected"]


@dataclass(frozen=True)
class Problem:
    """Sizes of one validated call."""

    batch: int
    heads: int
    seq_q: int
    seq_kv: int
    head_dim: int
    n_chunks: int
    scale: float


def chunk_mask_from_indices(selected_idx: Tensor, n_chunks: int) -> Tensor:
    """Bool ``[B, H, Sq, n_chunks]`` from an int index list ``[B, H, Sq, max_sel]`` padded with -1.

    Raises ``ValueError`` for indices outside ``[-1, n_chunks)``. Duplicates are harmless.
    """
    if selected_idx.is_floating_point() or selected_idx.dtype == torch.bool:
        raise ValueError(f"an index-list selection must be an integer tensor, got {selected_idx.dtype}")
    idx = selected_idx.long()
    if idx.numel() > 0 and bool(((idx < -1) | (idx >= n_chunks)).any()):
        raise ValueError(
            f"selected chunk indices must lie in [0, n_chunks={n_chunks}) (or -1 for padding)"
        )
    mask = torch.zeros(*idx.shape[:-1], n_chunks + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, torch.where(idx < 0, n_chunks, idx), True)  # -1 -> spill column, dropped
    return mask[..., :n_chunks]


def normalise_selected(selected: Tensor, n_chunks: int) -> Tensor:
    """The canonical bool chunk mask ``[B, H, Sq, n_chunks]`` from either accepted layout."""
    if not isinstance(selected, Tensor) or selected.dim() != 4:
        shape = tuple(selected.shape) if isinstance(selected, Tensor) else type(selected).__name__
        raise ValueError(
            "selected must be a bool chunk mask [B, H, Sq, n_chunks] or an int32 index list "
            f"[B, H, Sq, max_sel] padded with -1, got {shape}"
        )
    if selected.dtype == torch.bool:
        if selected.shape[-1] != n_chunks:
            raise ValueError(
                f"a bool selection must have n_chunks={n_chunks} columns (len(chunk_start) - 1), "
                f"got {selected.shape[-1]}"
            )
        return selected
    return chunk_mask_from_indices(selected, n_chunks)


def _check_layout(q: Tensor, k: Tensor, v: Tensor, chunk_start: Tensor, scale: float | None) -> Problem:
    """q/k/v and the key-chunk boundaries (one small read-back of ``chunk_start``)."""
    check_qkv(q, k, v)
    batch, heads, seq_q, head_dim = q.shape
    if k.shape[0] != batch or k.shape[1] != heads or k.shape[3] != head_dim:
        raise ValueError(f"k/v must be [B={batch}, H={heads}, S_kv, D={head_dim}] to match q, got {tuple(k.shape)}")
    seq_kv = k.shape[2]

    if (
        not isinstance(chunk_start, Tensor)
        or chunk_start.dim() != 1
        or chunk_start.numel() < 2
        or chunk_start.is_floating_point()
        or chunk_start.dtype == torch.bool
    ):
        raise ValueError(
            "chunk_start must be a 1-D integer tensor [n_chunks + 1] of key-chunk boundaries "
            "(0, ..., S_kv); build it with mmeff.video.vmoba_partition.chunk_starts(chunk_ids)"
        )
    if chunk_start.device != q.device:
        raise ValueError("chunk_start must be on the same device as q")
    bounds = chunk_start.tolist()  # n_chunks + 1 numbers: a cheap read-back
    if bounds[0] != 0 or bounds[-1] != seq_kv or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(
            f"chunk_start must be non-decreasing from 0 to S_kv={seq_kv}, got {bounds[:4]}...{bounds[-2:]}"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    return Problem(batch, heads, seq_q, seq_kv, head_dim, len(bounds) - 1, float(scale))


def _check_rows(selected: Tensor, prob: Problem) -> None:
    if tuple(selected.shape[:3]) != (prob.batch, prob.heads, prob.seq_q):
        raise ValueError(
            f"selected must be [B={prob.batch}, H={prob.heads}, Sq={prob.seq_q}, ...] (one row per query), "
            f"got {tuple(selected.shape)}"
        )


def check_inputs(q: Tensor, k: Tensor, v: Tensor, chunk_start: Tensor, selected: Tensor, scale: float | None) -> tuple[Problem, Tensor]:
    """Validate a call; return its sizes and the bool selection mask. Raise ``ValueError`` naming the fix."""
    prob = _check_layout(q, k, v, chunk_start, scale)
    if isinstance(selected, Tensor) and selected.device != q.device:
        raise ValueError("selected must be on the same device as q")
    mask = normalise_selected(selected, prob.n_chunks)
    _check_rows(selected, prob)
    return prob, mask


def check_index_inputs(q: Tensor, k: Tensor, v: Tensor, chunk_start: Tensor, idx: Tensor,
                       scale: float | None) -> Problem:
    """Validate a call that takes an index-list selection as is (key-major path): ``idx`` must be an
    integer ``[B, H, Sq, K]`` tensor with entries in ``[-1, n_chunks)`` (one read-back)."""
    prob = _check_layout(q, k, v, chunk_start, scale)
    if not isinstance(idx, Tensor) or idx.dim() != 4 or idx.is_floating_point() or idx.dtype == torch.bool:
        got = f"{tuple(idx.shape)} {idx.dtype}" if isinstance(idx, Tensor) else type(idx).__name__
        raise ValueError(
            f"the key-major path takes an integer index list [B, H, Sq, K] padded with -1, got {got}; "
            "convert a bool mask with chunk_routed_attention (query-major) instead"
        )
    if idx.device != q.device:
        raise ValueError("selected must be on the same device as q")
    _check_rows(idx, prob)
    if idx.numel() > 0 and bool(((idx < -1) | (idx >= prob.n_chunks)).any()):
        raise ValueError(f"selected chunk indices must lie in [0, n_chunks={prob.n_chunks}) (or -1 for padding)")
    return prob

