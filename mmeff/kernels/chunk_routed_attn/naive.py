"""Reference chunk-routed attention in plain torch: the ground truth and the CPU path.

It expands the per-query chunk selection into a dense per-token key mask and runs a masked
softmax in float32 (float64 for float64 inputs). Memory is O(B * H * Sq * Skv): meant for
tests and small inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_inputs

__all__ = ["chunk_routed_attention_naive", "key_chunk_index"]


def key_chunk_index(chunk_start: Tensor, seq_kv: int) -> Tensor:
    """The chunk of every key position ``[S_kv]`` (int64) from ``chunk_start [n_chunks + 1]``."""
    pos = torch.arange(seq_kv, device=chunk_start.device)
    return torch.searchsorted(chunk_start[1:].long().contiguous(), pos, right=True)


def chunk_routed_attention_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    chunk_start: Tensor,
    selected: Tensor,
    *,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Attend every query row to the keys of the chunks it selected; return ``(out, lse)``.

    ``q`` is ``[B, H, Sq, D]``, ``k``/``v`` ``[B, H, Skv, D]``. Key chunk ``c`` holds keys
    ``[chunk_start[c], chunk_start[c+1])`` (any lengths; a ragged last chunk is fine).
    ``selected`` is either a bool mask ``[B, H, Sq, n_chunks]`` or an integer index list
    ``[B, H, Sq, max_sel]`` padded with ``-1``. ``out`` (dtype of ``q``) is
    ``softmax(scale * q k^T) v`` over the selected keys of each row; ``lse`` (float32) is the
    natural log-sum-exp of the scaled logits, ``-inf`` for a row with no key (its ``out`` is 0).
    """
    p, sel = check_inputs(q, k, v, chunk_start, selected, scale)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    key_mask = sel[..., key_chunk_index(chunk_start, p.seq_kv)]  # [B, H, Sq, Skv]
    logits = torch.matmul(q.to(acc_dtype), k.to(acc_dtype).transpose(-1, -2)) * p.scale
    logits = logits.masked_fill(~key_mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # -inf where a row has no key
    probs = torch.where(key_mask, torch.exp(logits - lse.unsqueeze(-1)), torch.zeros_like(logits))
    out = torch.matmul(probs, v.to(acc_dtype))
    return out.to(q.dtype), lse.to(torch.float32)
