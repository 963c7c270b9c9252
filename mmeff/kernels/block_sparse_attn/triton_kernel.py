"""Triton forward kernel for block-sparse attention over compacted key-block lists.

One program handles one (query block, batch*head) pair and loops only over the key blocks
listed for it (``kv_block_count`` iterations), with an fp32 online softmax in base 2. The
epilogue fuses ``out = row_scale[i] * out + row_add[i]`` (Rectified SpaAttn's
``O = R * O_sparse + O_nc``) and writes the natural-log LSE.

Whether ``@triton.jit`` compiles for the GPU or builds the CPU interpreter is decided by
Triton when this module is imported (``TRITON_INTERPRET=1`` must be set before that).
"""

from __future__ import annotations

import torch
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
from ._checks import check_inputs

__all__ = ["HAS_TRITON", "SUPPORTED_BLOCKS", "SUPPORTED_HEAD_DIMS", "block_sparse_attention_triton"]

SUPPORTED_HEAD_DIMS = TRITON_HEAD_DIMS
SUPPORTED_BLOCKS = TRITON_BLOCKS
_LOG2E = 1.4426950408889634


if HAS_TRITON:

    @triton.jit
    def _bsa_fwd_kernel(
        Q, K, V, O, LSE, IDX, CNT, KVLEN, RS, RA,
        stride_qb, stride_qh, stride_qs,
        stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_os,
        stride_lb, stride_lh,
        stride_ib, stride_ih, stride_im, stride_ik,
        stride_cb, stride_ch, stride_cm,
        stride_rsb, stride_rsh, stride_rsm,
        stride_rab, stride_rah, stride_ram, stride_rad,
        H, SEQ_Q, SEQ_KV, MAX_K, qk_scale,
        HAS_KVLEN: tl.constexpr,
        HAS_ROW_SCALE: tl.constexpr,
        HAS_ROW_ADD: tl.constexpr,
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

        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

        kv_end = SEQ_KV
        if HAS_KVLEN:
            kv_end = tl.minimum(tl.load(KVLEN + b).to(tl.int32), SEQ_KV)

        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        idx_base = IDX + b * stride_ib + h * stride_ih + pid_m * stride_im
        # Clamp the count so a malformed count never reads past the index row.
        count = tl.minimum(tl.load(CNT + b * stride_cb + h * stride_ch + pid_m * stride_cm).to(tl.int32), MAX_K)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 units
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of 2^(s - m_i)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        for j in range(count):
            kb = tl.load(idx_base + j * stride_ik).to(tl.int32)
            offs_k = kb * BLOCK_N + offs_n
            # kb < 0 (padding) or keys past kv_end / SEQ_KV contribute nothing.
            col_ok = (offs_k < kv_end) & (kb >= 0)
            k = tl.load(k_base + offs_k[None, :] * stride_ks + offs_d[:, None], mask=col_ok[None, :], other=0.0)
            v = tl.load(v_base + offs_k[:, None] * stride_vs + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            m_i, l_i, acc = attend_key_tile(q, k, v, col_ok[None, :], m_i, l_i, acc, qk_scale,
                                            DOT_PRECISION, DOT_IN_FP32)

        out, lse = finish_rows(m_i, l_i, acc)
        if HAS_ROW_SCALE:
            r = tl.load(RS + b * stride_rsb + h * stride_rsh + pid_m * stride_rsm).to(tl.float32)
            out = out * r
        if HAS_ROW_ADD:
            add = tl.load(RA + b * stride_rab + h * stride_rah + pid_m * stride_ram + offs_d * stride_rad)
            out = out + add.to(tl.float32)[None, :]
        o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])

        tl.store(LSE + b * stride_lb + h * stride_lh + offs_m, lse, mask=row_ok)


def _is_interpreted() -> bool:
    """True when the kernel was built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_bsa_fwd_kernel).__name__ == "InterpretedFunction"


def _unit_last_dim(t: Tensor) -> Tensor:
    """Keep strided views (e.g. a transposed [B, S, H, D]) but make the last dim contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _default_num_warps(block_m: int, block_n: int, head_dim: int) -> int:
    return 8 if block_m * max(block_n, head_dim) >= 128 * 128 else 4


def block_sparse_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_block_idx: Tensor,
    kv_block_count: Tensor,
    *,
    block_m: int,
    block_n: int,
    scale: float | None = None,
    kv_len: Tensor | None = None,
    row_scale: Tensor | None = None,
    row_add: Tensor | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton block-sparse attention; same contract as ``block_sparse_attention_naive``.

    Index values are not read back (no host sync): listed indices must be unique and in range.
    Out-of-range, negative or excess entries are masked rather than read out of bounds.
    ``num_warps``/``num_stages`` override the launch heuristics (for benchmarking).
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use block_sparse_attention_naive or install triton")
    prob = check_inputs(
        q, k, v, kv_block_idx, kv_block_count,
        block_m=block_m, block_n=block_n, scale=scale, kv_len=kv_len,
        row_scale=row_scale, row_add=row_add, check_values=False,
    )
    check_triton_launch(q.dtype, prob.head_dim, block_m, block_n, "block_sparse_attention_naive")

    q, k, v = _unit_last_dim(q), _unit_last_dim(k), _unit_last_dim(v)
    out = torch.empty_like(q)  # keeps q's memory layout, so a transposed view costs no copy
    if out.stride(-1) != 1:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((prob.batch, prob.heads, prob.seq_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse

    idx, cnt = kv_block_idx, kv_block_count
    max_k = idx.shape[-1]
    if max_k == 0:  # nothing is attended; give the kernel a real (never read) row
        idx = torch.full((*idx.shape[:-1], 1), -1, dtype=torch.int32, device=q.device)
    dummy = lse  # stands in for absent optional tensors (never read: constexpr flags)
    rs = row_scale if row_scale is not None else dummy
    ra = row_add if row_add is not None else dummy
    rs_strides = row_scale.stride() if row_scale is not None else (0, 0, 0)
    ra_strides = row_add.stride() if row_add is not None else (0, 0, 0, 0)

    # Triton's CPU interpreter multiplies bf16 tiles as raw uint16 in tl.dot, so there the
    # 16-bit tiles are widened to fp32 first (exact products, same fp32 accumulation).
    interpreted = _is_interpreted()
    grid = (prob.n_qblk, prob.batch * prob.heads)
    _bsa_fwd_kernel[grid](
        q, k, v, out, lse, idx, cnt,
        kv_len if kv_len is not None else dummy, rs, ra,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        *idx.stride(),
        *cnt.stride(),
        *rs_strides,
        *ra_strides,
        prob.heads, prob.seq_q, prob.seq_kv, max_k, prob.scale * _LOG2E,
        HAS_KVLEN=kv_len is not None,
        HAS_ROW_SCALE=row_scale is not None,
        HAS_ROW_ADD=row_add is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_DIM=prob.head_dim,
        DOT_PRECISION="ieee" if (q.dtype == torch.float32 or interpreted) else "tf32",
        DOT_IN_FP32=interpreted and q.dtype != torch.float32,
        num_warps=num_warps or _default_num_warps(block_m, block_n, prob.head_dim),
        num_stages=num_stages or default_num_stages(block_m, block_n, prob.head_dim, q.element_size()),
    )
    return out, lse
