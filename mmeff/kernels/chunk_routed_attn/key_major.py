"""Key-major chunk-routed attention in Triton: one tile per (chunk, run of queries that chose it).

Same contract as ``chunk_routed_attention_naive`` with an index-list selection ``idx
[B, H, Sq, K]`` (``-1`` = empty slot, chunks distinct within a row), but the work is laid
out by key chunk (``key_major_layout``):

1. ``_km_partial_kernel``: each program gathers up to ``BLOCK_M`` queries that all chose one
   chunk, runs an online softmax over exactly that chunk's keys, and writes one partial output
   row (in the input dtype) and its float32 log-sum-exp per (query, chunk) pair;
2. ``_km_merge_kernel``: each query merges its ``K`` partials through their LSEs (float32).

Keys read = keys needed, so the cost follows the per-query density (3-5% for VMoBA top-k at
Wan shapes) instead of the query tile's union (18-27%). The price is the partial buffer,
``B*H*Sq*K*(D*itemsize + 4)`` bytes written and read once (1.5 GB in bf16 for Wan 1.3B 480p,
top-15): fine for top-k, too much for threshold routing at 14% density, which stays on the
query-major kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._common import HAS_TRITON, check_triton_launch, default_num_stages, tl, triton
from .._online_softmax import attend_key_tile, finish_rows
from ._checks import check_index_inputs
from .key_major_layout import key_major_layout

__all__ = ["chunk_routed_attention_key_major", "launch_options"]

_LOG2E = 1.4426950408889634


if HAS_TRITON:

    @triton.jit
    def _km_partial_kernel(
        Q, K, V, PO, PL, PAIR_QUERY, GROUP_START, TILE_GROUP, TILE_FIRST, CSTART,
        stride_qb, stride_qh, stride_qs,
        stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs,
        H, N_CHUNKS, N_GROUPS, qk_scale,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,
    ):
        t = tl.program_id(0)
        g_raw = tl.load(TILE_GROUP + t)
        live = g_raw < N_GROUPS  # tiles past the real count do nothing
        g = tl.where(live, g_raw, 0)
        first = tl.load(TILE_FIRST + t).to(tl.int64)
        g_end = tl.load(GROUP_START + g + 1).to(tl.int64)
        bh = g // (N_CHUNKS + 1)
        c = g % (N_CHUNKS + 1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)

        offs_m = first + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = (offs_m < g_end) & live
        s_idx = tl.load(PAIR_QUERY + offs_m, mask=row_ok, other=0).to(tl.int64)
        q = tl.load(
            Q + b * stride_qb + h * stride_qh + s_idx[:, None] * stride_qs + offs_d[None, :],
            mask=row_ok[:, None], other=0.0,
        )
        start = tl.load(CSTART + c).to(tl.int32)
        end = tl.load(CSTART + c + 1).to(tl.int32)
        end = tl.where(live, end, start)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 units
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_k = n0 + offs_n
            col_ok = offs_k < end
            k = tl.load(k_base + offs_k[None, :] * stride_ks + offs_d[:, None], mask=col_ok[None, :], other=0.0)
            v = tl.load(v_base + offs_k[:, None] * stride_vs + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            m_i, l_i, acc = attend_key_tile(q, k, v, col_ok[None, :], m_i, l_i, acc, qk_scale,
                                            DOT_PRECISION, DOT_IN_FP32)

        out, lse = finish_rows(m_i, l_i, acc)
        tl.store(PO + offs_m[:, None] * HEAD_DIM + offs_d[None, :], out.to(PO.dtype.element_ty), mask=row_ok[:, None])
        tl.store(PL + offs_m, lse, mask=row_ok)

    @triton.jit
    def _km_merge_kernel(
        PO, PL, IDX, SLOT_PAIR, O, LSE,
        stride_ib, stride_ih, stride_is,
        stride_pb, stride_ph, stride_ps,
        stride_ob, stride_oh, stride_os,
        stride_lb, stride_lh,
        H, SEQ_Q, N_SLOTS,
        BLOCK_M: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < SEQ_Q
        idx_rows = IDX + b * stride_ib + h * stride_ih + offs_m.to(tl.int64) * stride_is
        pair_rows = SLOT_PAIR + b * stride_pb + h * stride_ph + offs_m.to(tl.int64) * stride_ps

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for j in range(N_SLOTS):
            chunk = tl.load(idx_rows + j, mask=row_ok, other=-1)
            pair = tl.load(pair_rows + j, mask=row_ok, other=0).to(tl.int64)
            used = row_ok & (chunk >= 0)
            lse_j = tl.load(PL + pair, mask=used, other=float("-inf"))
            o_j = tl.load(PO + pair[:, None] * HEAD_DIM + offs_d[None, :], mask=used[:, None], other=0.0).to(tl.float32)
            m_new = tl.maximum(m_i, lse_j)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            w = tl.exp(lse_j - m_safe)
            l_i = l_i * alpha + w
            acc = acc * alpha[:, None] + w[:, None] * o_j
            m_i = m_new

        has_key = l_i > 0.0
        l_safe = tl.where(has_key, l_i, 1.0)
        out = acc / l_safe[:, None]
        o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
        lse = tl.where(has_key, m_i + tl.log(l_safe), float("-inf"))
        tl.store(LSE + b * stride_lb + h * stride_lh + offs_m, lse, mask=row_ok)


def launch_options(block_m: int, block_n: int, head_dim: int, element_size: int) -> dict[str, int]:
    """Default warps and pipeline stages of the partial kernel (shared-memory fit from ``default_num_stages``)."""
    return {"num_warps": 8 if block_m * max(block_n, head_dim) >= 128 * 128 else 4,
            "num_stages": default_num_stages(block_m, block_n, head_dim, element_size)}


def _interpreted() -> bool:
    return HAS_TRITON and type(_km_partial_kernel).__name__ == "InterpretedFunction"


def chunk_routed_attention_key_major(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    chunk_start: Tensor,
    idx: Tensor,
    *,
    scale: float | None = None,
    block_m: int = 64,
    block_n: int = 32,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Key-major chunk-routed attention; returns ``(out [B,H,Sq,D] in q.dtype, lse [B,H,Sq] float32)``.

    ``idx`` is an int index list ``[B, H, Sq, K]`` (``-1`` = empty slot) whose chunks are
    distinct within a row (VMoBA's top-k routing guarantees it; a repeated chunk would count
    twice). Partials are kept in the input dtype (one extra rounding for 16-bit inputs).
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use chunk_routed_attention_naive")
    prob = check_index_inputs(q, k, v, chunk_start, idx, scale)
    check_triton_launch(q.dtype, prob.head_dim, block_m, block_n, "chunk_routed_attention_naive")
    if idx.numel() >= 2**31:
        raise ValueError("the key-major path indexes pairs with int32; split the heads into smaller calls")

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((prob.batch, prob.heads, prob.seq_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or idx.shape[-1] == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse

    lay = key_major_layout(idx, prob.n_chunks, block_m)
    partial_o = torch.empty((lay.n_pairs, prob.head_dim), dtype=q.dtype, device=q.device)
    partial_l = torch.empty((lay.n_pairs,), dtype=torch.float32, device=q.device)
    cstart = chunk_start.to(torch.int32).contiguous()
    interpreted = _interpreted()
    _km_partial_kernel[(lay.tile_group.numel(),)](
        q, k, v, partial_o, partial_l, lay.pair_query, lay.group_start, lay.tile_group, lay.tile_first, cstart,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        prob.heads, prob.n_chunks, lay.n_groups, prob.scale * _LOG2E,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_DIM=prob.head_dim,
        DOT_PRECISION="ieee" if (q.dtype == torch.float32 or interpreted) else "tf32",
        DOT_IN_FP32=interpreted and q.dtype != torch.float32,
        **{**launch_options(block_m, block_n, prob.head_dim, q.element_size()),
           **({"num_warps": num_warps} if num_warps else {}), **({"num_stages": num_stages} if num_stages else {})},
    )
    idx32 = idx.to(torch.int32).contiguous()
    slot_pair = lay.pair_of_slot
    merge_m = 32
    _km_merge_kernel[(triton.cdiv(prob.seq_q, merge_m), prob.batch * prob.heads)](
        partial_o, partial_l, idx32, slot_pair, out, lse,
        idx32.stride(0), idx32.stride(1), idx32.stride(2),
        slot_pair.stride(0), slot_pair.stride(1), slot_pair.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        prob.heads, prob.seq_q, idx32.shape[-1],
        BLOCK_M=merge_m,
        HEAD_DIM=prob.head_dim,
    )
    return out, lse
