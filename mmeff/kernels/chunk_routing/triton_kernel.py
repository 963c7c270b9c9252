"""Triton chunk routing: gates and the per-row top-k / threshold choice in one pass.

One program takes ``BLOCK_M`` query rows of one (batch, head) and every chunk mean at once
(``C_PAD`` = the chunk count rounded up to a power of two): the gate tile ``[BLOCK_M, C_PAD]``
is built in registers by a float32 ``tl.dot`` over ``BLOCK_D`` slices of the head dim, and
the choice is made right there, so the ``[S, n_chunks]`` gates never reach global memory and
no sort runs:

- top-k: ``K`` rounds of row-wise ``argmax`` (the own chunk boosted to +inf first, ties to the
  lower index, as the stable sort of the torch path);
- threshold: min-max normalisation, then the official cumulative-share prefix (the own chunk
  competing at 0) is found by a bisection over the *bit patterns* of the normalised gates
  (non-negative float32 values order like their int32 bits, so 31 halvings find the exact
  boundary value); entries tied at the boundary are taken in index order, as the stable sort
  would, and the first-ranked entry (largest value, lowest index) is always kept.

Only the chosen chunks are written: an int32 index list (top-k) or a byte mask (threshold).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._common import HAS_TRITON, tl, triton

__all__ = ["MAX_CHUNKS", "launch_config", "route_chunks_triton"]

MAX_CHUNKS = 2048  # the gate tile lives in registers; beyond this use the torch path


if HAS_TRITON:

    @triton.jit
    def _route_kernel(
        Q, KBAR, QCHUNK, OUT,
        stride_qb, stride_qh, stride_qs,
        stride_kb, stride_kh, stride_kc,
        stride_ob, stride_oh, stride_os,
        H, SEQ, N_CHUNKS, N_OUT, threshold,
        TOPK_MODE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        C_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BISECT_STEPS: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_c = tl.arange(0, C_PAD)
        row_ok = offs_m < SEQ
        col_ok = offs_c < N_CHUNKS

        q_base = Q + b * stride_qb + h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qs
        k_base = KBAR + b * stride_kb + h * stride_kh + offs_c[None, :] * stride_kc
        gates = tl.zeros([BLOCK_M, C_PAD], dtype=tl.float32)
        for d0 in range(0, HEAD_DIM, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            qd = tl.load(q_base + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
            kd = tl.load(k_base + offs_d[:, None], mask=col_ok[None, :], other=0.0).to(tl.float32)
            gates += tl.dot(qd, kd, input_precision="ieee")

        own = tl.load(QCHUNK + offs_m, mask=row_ok, other=0).to(tl.int32)
        is_own = offs_c[None, :] == own[:, None]
        out_rows = OUT + b * stride_ob + h * stride_oh + offs_m.to(tl.int64) * stride_os

        if TOPK_MODE:
            score = tl.where(col_ok[None, :], gates, float("-inf"))
            score = tl.where(is_own, float("inf"), score)
            for j in range(N_OUT):
                best = tl.argmax(score, axis=1, tie_break_left=True).to(tl.int32)
                tl.store(out_rows + j, best, mask=row_ok)
                score = tl.where(offs_c[None, :] == best[:, None], float("-inf"), score)
        else:
            lo = tl.min(tl.where(col_ok[None, :], gates, float("inf")), axis=1)
            hi = tl.max(tl.where(col_ok[None, :], gates, float("-inf")), axis=1)
            rng = hi - lo
            norm = (gates - lo[:, None]) / tl.where(rng <= 1e-6, 1.0, rng)[:, None]  # official EPS guard
            norm = tl.where(col_ok[None, :], norm, 0.0)
            total = tl.sum(norm, axis=1) + 1e-6
            own_share = tl.sum(tl.where(is_own, norm, 0.0), axis=1) / total
            remain = tl.maximum(threshold - own_share, 0.0)
            # the own chunk competes at 0 (official); padding columns get -1 and are never chosen
            others = tl.where(col_ok[None, :], tl.where(is_own, 0.0, norm), -1.0)
            bits = others.to(tl.int32, bitcast=True)  # negative for the padding columns
            # Smallest bit threshold t whose strictly-greater mass is still below the target.
            t_lo = tl.full([BLOCK_M], -1, dtype=tl.int32)  # predicate false (by convention)
            # 0x3F800001 = the int32 bits of 1.0f plus one, above every normalised gate (a literal: compiled
            # Triton refuses non-constexpr globals); the predicate holds there whenever remain > 0
            t_hi = tl.full([BLOCK_M], 0x3F800001, dtype=tl.int32)
            for _ in range(BISECT_STEPS):
                mid = t_lo + (t_hi - t_lo) // 2
                above = tl.sum(tl.where(bits > mid[:, None], others, 0.0), axis=1)
                ok = above / total < remain
                t_hi = tl.where(ok, mid, t_hi)
                t_lo = tl.where(ok, t_lo, mid)
            boundary = t_hi
            above = tl.sum(tl.where(bits > boundary[:, None], others, 0.0), axis=1)
            tied = bits == boundary[:, None]
            rank = tl.cumsum(tied.to(tl.int32), axis=1) - tied.to(tl.int32)  # tied entries ahead
            tie_before = above[:, None] + rank.to(tl.float32) * others
            take = (bits > boundary[:, None]) | (tied & (tie_before / total[:, None] < remain[:, None]))
            take = take & (remain > 0.0)[:, None] & (others >= 0.0)
            # the first-ranked entry (largest value, lowest index among ties) is always kept
            top = tl.max(others, axis=1)
            first = tl.min(tl.where(others == top[:, None], offs_c[None, :], C_PAD), axis=1)
            take = take | (offs_c[None, :] == first[:, None])
            chosen = take | is_own
            tl.store(out_rows[:, None] + offs_c[None, :], chosen.to(tl.int8), mask=row_ok[:, None] & col_ok[None, :])


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def launch_config(n_chunks: int, head_dim: int) -> dict[str, int]:
    """Tile sizes and launch options for ``n_chunks`` chunk means of ``head_dim``.

    The gate tile ``[BLOCK_M, C_PAD]`` stays in registers; each pipeline stage buffers one
    ``[BLOCK_D, C_PAD]`` float32 slice of the chunk means in shared memory, so the widest
    tiles get a single stage (2048 chunks at 3 stages would need 263 KB, above an H100's 227 KB;
    ``tests/kernels/test_sm90_compile.py`` compiles these configurations for sm_90).
    """
    c_pad = max(16, _next_pow2(n_chunks))
    return {
        "C_PAD": c_pad,
        "BLOCK_M": 16 if c_pad >= 256 else 32,
        "BLOCK_D": 16 if c_pad >= 1024 else min(head_dim, 32),
        "num_warps": 8 if c_pad >= 512 else 4,
        "num_stages": 3 if c_pad <= 1024 else 1,
    }


def route_chunks_triton(
    q: Tensor,
    chunk_means: Tensor,
    query_chunk: Tensor,
    *,
    mode: str,
    topk: int = 3,
    threshold: float = 0.25,
) -> Tensor:
    """Triton twin of ``route_chunks_naive`` (same arguments and outputs)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use route_chunks_naive")
    bsz, heads, seq, dim = q.shape
    n_chunks = chunk_means.shape[2]
    if n_chunks > MAX_CHUNKS:
        raise ValueError(
            f"the Triton router holds every chunk's gate in registers and takes at most {MAX_CHUNKS} "
            f"chunks, got {n_chunks}; use larger chunks or route_chunks_naive"
        )
    if dim < 16 or dim & (dim - 1):
        raise ValueError(f"the Triton router needs a power-of-two head dim >= 16, got {dim}; use route_chunks_naive")
    cfg = launch_config(n_chunks, dim)
    q = q if q.stride(-1) == 1 else q.contiguous()
    means = chunk_means.float().contiguous()
    qc = query_chunk.to(device=q.device, dtype=torch.int32).contiguous()
    if mode == "topk":
        n_out = min(topk, n_chunks)
        out = torch.empty((bsz, heads, seq, n_out), dtype=torch.int32, device=q.device)
    else:
        n_out = n_chunks
        out = torch.empty((bsz, heads, seq, n_chunks), dtype=torch.bool, device=q.device)
    if out.numel() == 0:
        return out
    store = out.view(torch.int8) if out.dtype == torch.bool else out
    grid = (triton.cdiv(seq, cfg["BLOCK_M"]), bsz * heads)
    _route_kernel[grid](
        q, means, qc, store,
        q.stride(0), q.stride(1), q.stride(2),
        means.stride(0), means.stride(1), means.stride(2),
        store.stride(0), store.stride(1), store.stride(2),
        heads, seq, n_chunks, n_out, float(threshold),
        TOPK_MODE=mode == "topk",
        HEAD_DIM=dim,
        BISECT_STEPS=31,
        **cfg,
    )
    return out
