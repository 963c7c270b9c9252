"""Reference block-sparse attention in plain torch: the ground truth and the CPU path.

It expands the block lists into a dense per-token key mask and runs a masked softmax in
float32. Memory is O(B * H * Sq * Skv), so it is meant for tests and small inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_inputs
from .layout import indices_to_mask

__all__ = ["block_sparse_attention_naive"]


def block_sparse_attention_naive(
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
) -> tuple[Tensor, Tensor]:
    """Attend each query block to its listed key blocks only; return ``(out, lse)``.

    ``q`` is ``[B, H, Sq, D]``, ``k``/``v`` are ``[B, H, Skv, D]``. Query block ``i`` holds rows
    ``[i*block_m, (i+1)*block_m)`` and key block ``j`` holds keys ``[j*block_n, (j+1)*block_n)``;
    the last block of each may be ragged. ``kv_len[b]`` masks keys at positions ``>= kv_len[b]``.
    ``out`` (dtype of ``q``) is ``row_scale[i] * softmax(scale * q k^T) v + row_add[i]`` over the
    attended keys; ``lse`` (float32) is the natural log-sum-exp of the scaled logits, ``-inf``
    for a row with no key (its softmax part is then 0).
    """
    p = check_inputs(
        q, k, v, kv_block_idx, kv_block_count,
        block_m=block_m, block_n=block_n, scale=scale, kv_len=kv_len,
        row_scale=row_scale, row_add=row_add, check_values=True,
    )
    dev = q.device
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    block_mask = indices_to_mask(kv_block_idx, kv_block_count, p.n_kblk)  # [B, H, nq, nk]
    q_blk = torch.arange(p.seq_q, device=dev) // block_m  # query row -> query block
    k_blk = torch.arange(p.seq_kv, device=dev) // block_n  # key col -> key block
    key_mask = block_mask[:, :, q_blk][:, :, :, k_blk]  # [B, H, Sq, Skv]
    if kv_len is not None:
        in_len = torch.arange(p.seq_kv, device=dev)[None, :] < kv_len.to(dev)[:, None]  # [B, Skv]
        key_mask = key_mask & in_len[:, None, None, :]

    logits = torch.matmul(q.to(acc_dtype), k.to(acc_dtype).transpose(-1, -2)) * p.scale
    logits = logits.masked_fill(~key_mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # -inf where a row has no key
    probs = torch.where(key_mask, torch.exp(logits - lse.unsqueeze(-1)), torch.zeros_like(logits))
    out = torch.matmul(probs, v.to(acc_dtype))

    if row_scale is not None:
        out = out * row_scale.to(acc_dtype)[:, :, q_blk].unsqueeze(-1)
    if row_add is not None:
        out = out + row_add.to(acc_dtype)[:, :, q_blk]
    return out.to(q.dtype), lse.to(torch.float32)
