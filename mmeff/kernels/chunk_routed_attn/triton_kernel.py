"""Triton forward kernel for chunk-routed attention (per-query chunk selection).

Routing in VMoBA is per query *token*, while a FlashAttention-style kernel works on query
*tiles*. This kernel takes the per-tile union approach:

- the host turns the bool selection ``[B, H, Sq, n_chunks]`` into, per (b, h, query tile),
  the ascending list of chunks selected by ANY row of the tile (``[B, H, n_qtiles, max_u]``
  int32 padded with -1, plus counts);
- one program handles one (query tile, b*h) pair, loops over its union list and, for each
  chunk, over the chunk's keys in ``BLOCK_N`` steps (chunks have arbitrary lengths, so a
  ragged last chunk or chunks that are not multiples of ``BLOCK_N`` are fine);
- inside, each row's own selection bit for the chunk (one byte per row, read from the bool
  mask) masks the logits of rows that did not pick it, so every row gets exactly its own
  softmax. Work is wasted only where rows of one tile disagree (VMoBA's pitfall (b)).

The online softmax runs in fp32, base 2; the kernel writes ``out`` and the natural-log LSE
(``-inf`` for rows with no key), which the VMoBA self/routed merge needs.

Whether ``@triton.jit`` compiles for the GPU or builds the CPU interpreter is decided by
Triton when this module is imported (``TRITON_INTERPRET=1`` must be set before that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._common import (
    HAS_TRITON,
    TRITON_BLOCKS,
    TRITON_HEAD_DIMS,
    check_triton_launch,
    default_num_stages,
    tl,
    triton,
)
from .._online_softmax import attend_key_tile, finish_rows
from ..block_sparse_attn.layout import mask_to_indices
from ._checks import check_inputs

__all__ = [
    "HAS_TRITON",
    "SUPPORTED_BLOCKS",
    "SUPPORTED_HEAD_DIMS",
    "chunk_routed_attention_triton",
    "tile_union",
]

SUPPORTED_HEAD_DIMS = TRITON_HEAD_DIMS
SUPPORTED_BLOCKS = TRITON_BLOCKS
_LOG2E = 1.4426950408889634


if HAS_TRITON:

    @triton.jit
    def _cra_fwd_kernel(
        Q, K, V, O, LSE, SEL, TIDX, TCNT, CSTART,
        stride_qb, stride_qh, stride_qs,
        stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_os,
        stride_lb, stride_lh,
        stride_sb, stride_sh, stride_ss, stride_sc,
        stride_tb, stride_th, stride_tm, stride_tk,
        stride_cb, stride_ch, stride_cm,
        H, SEQ_Q, MAX_U, qk_scale,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        # 64-bit batch/head offsets: B*H*S*D can exceed 2^31 for long videos.
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < SEQ_Q

        q = tl.load(
            Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
            mask=row_ok[:, None], other=0.0,
        )
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        sel_rows = SEL + b * stride_sb + h * stride_sh + offs_m.to(tl.int64) * stride_ss
        t_base = TIDX + b * stride_tb + h * stride_th + pid_m * stride_tm
        # Clamp the count so a malformed count never reads past the union row.
        count = tl.minimum(tl.load(TCNT + b * stride_cb + h * stride_ch + pid_m * stride_cm).to(tl.int32), MAX_U)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 units
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of 2^(s - m_i)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        for j in range(count):
            c = tl.load(t_base + j * stride_tk).to(tl.int32)
            c_safe = tl.maximum(c, 0)
            start = tl.load(CSTART + c_safe).to(tl.int32)
            end = tl.load(CSTART + c_safe + 1).to(tl.int32)
            end = tl.where(c >= 0, end, start)  # a -1 pad entry attends nothing
            # Each row's own bit for this chunk: rows that did not select it stay masked.
            row_sel = tl.load(sel_rows + c_safe * stride_sc, mask=row_ok, other=0) != 0
            for n0 in range(start, end, BLOCK_N):
                offs_k = n0 + offs_n
                col_ok = offs_k < end
                k = tl.load(k_base + offs_k[None, :] * stride_ks + offs_d[:, None], mask=col_ok[None, :], other=0.0)
                v = tl.load(v_base + offs_k[:, None] * stride_vs + offs_d[None, :], mask=col_ok[:, None], other=0.0)
                m_i, l_i, acc = attend_key_tile(q, k, v, row_sel[:, None] & col_ok[None, :], m_i, l_i, acc, qk_scale,
                                                DOT_PRECISION, DOT_IN_FP32)

        out, lse = finish_rows(m_i, l_i, acc)
        o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(LSE + b * stride_lb + h * stride_lh + offs_m, lse, mask=row_ok)


def _is_interpreted() -> bool:
    """True when the kernel was built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return HAS_TRITON and type(_cra_fwd_kernel).__name__ == "InterpretedFunction"


def _unit_last_dim(t: Tensor) -> Tensor:
    """Keep strided views (e.g. a transposed [B, S, H, D]) but make the last dim contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


def tile_union(selected: Tensor, block_m: int) -> tuple[Tensor, Tensor]:
    """Per query tile, the ascending chunks selected by any of its rows.

    ``selected`` is bool ``[B, H, Sq, n_chunks]``; returns ``(tile_idx [B, H, n_qtiles, max_u]``
    int32 padded with -1, ``tile_cnt [B, H, n_qtiles]`` int32). Reads one number back (``max_u``).
    """
    b, h, sq, n_chunks = selected.shape
    n_tiles = -(-sq // block_m)
    pad = n_tiles * block_m - sq
    sel = F.pad(selected, (0, 0, 0, pad)) if pad else selected
    union = sel.reshape(b, h, n_tiles, block_m, n_chunks).any(dim=3)
    return mask_to_indices(union)


def chunk_routed_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    chunk_start: Tensor,
    selected: Tensor,
    *,
    scale: float | None = None,
    block_m: int = 64,
    block_n: int = 32,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton chunk-routed attention; same contract as ``chunk_routed_attention_naive``.

    ``block_m`` is the query tile (smaller tiles waste less work when rows of a tile route
    differently), ``block_n`` the key step inside a chunk. The defaults were fastest on an H100
    at Wan 1.3B and 14B shapes (64x32 beat 64x64 by 1.1-1.2x; 16- and 32-row tiles read fewer
    keys but ran slower; see docs/results/gpu-2026-11-22). ``num_warps``/``num_stages``
    override the launch heuristics (for benchmarking).
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use chunk_routed_attention_naive or install triton")
    prob, sel = check_inputs(q, k, v, chunk_start, selected, scale)
    check_triton_launch(q.dtype, prob.head_dim, block_m, block_n, "chunk_routed_attention_naive")

    q, k, v = _unit_last_dim(q), _unit_last_dim(k), _unit_last_dim(v)
    out = torch.empty_like(q)  # keeps q's memory layout, so a transposed view costs no copy
    if out.stride(-1) != 1:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((prob.batch, prob.heads, prob.seq_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse

    tidx, tcnt = tile_union(sel, block_m)
    if tidx.shape[-1] == 0:  # nothing is attended anywhere; give the kernel a real (never read) row
        tidx = torch.full((*tidx.shape[:-1], 1), -1, dtype=torch.int32, device=q.device)
    sel_u8 = sel.view(torch.uint8)
    cstart = chunk_start.to(torch.int32).contiguous()

    # Triton's CPU interpreter multiplies bf16 tiles as raw uint16 in tl.dot, so there the
    # 16-bit tiles are widened to fp32 first (exact products, same fp32 accumulation).
    interpreted = _is_interpreted()
    grid = (-(-prob.seq_q // block_m), prob.batch * prob.heads)
    _cra_fwd_kernel[grid](
        q, k, v, out, lse, sel_u8, tidx, tcnt, cstart,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        *sel_u8.stride(),
        *tidx.stride(),
        *tcnt.stride(),
        prob.heads, prob.seq_q, tidx.shape[-1], prob.scale * _LOG2E,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_DIM=prob.head_dim,
        DOT_PRECISION="ieee" if (q.dtype == torch.float32 or interpreted) else "tf32",
        DOT_IN_FP32=interpreted and q.dtype != torch.float32,
        num_warps=num_warps or (8 if block_m * max(block_n, prob.head_dim) >= 128 * 128 else 4),
        num_stages=num_stages or default_num_stages(block_m, block_n, prob.head_dim, q.element_size()),
    )
    return out, lse
