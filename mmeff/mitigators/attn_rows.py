"""Attention probabilities of a few query rows of one layer, recomputed from its own projections.

Used where a mitigator needs some rows of the attention map (GIFT's question rows at prefill, its decode
rows) while the layer itself keeps running SDPA: O(rows x keys), never the L x L map.
"""
from __future__ import annotations

import sys
from typing import Any

import torch

from ..core.errors import IncompatibleFeatureError, UnsupportedModelError


def rotated(attn: torch.nn.Module, hidden: torch.Tensor, proj: torch.nn.Module, cos: torch.Tensor,
            sin: torch.Tensor) -> torch.Tensor:
    """``proj(hidden)`` split into heads ``[B, h, n, d]`` with RoPE at the given cos / sin rows."""
    bsz, n, _ = hidden.shape
    x = proj(hidden).view(bsz, n, -1, attn.head_dim).transpose(1, 2)
    norm = getattr(attn, "q_norm" if proj is attn.q_proj else "k_norm", None)
    if norm is not None:
        x = norm(x)
    return _rope(attn)(x, x, cos, sin)[0]


def rotated_pair(attn: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` ``[B, H, n, d]`` and ``k`` ``[B, h_kv, n, d]`` of the same rows, RoPE applied in one call."""
    bsz, n, _ = hidden.shape
    q = attn.q_proj(hidden).view(bsz, n, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(hidden).view(bsz, n, -1, attn.head_dim).transpose(1, 2)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    return _rope(attn)(q, k, cos, sin)


def _rope(attn: torch.nn.Module) -> Any:
    rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if rope is None:
        raise UnsupportedModelError(f"cannot find apply_rotary_pos_emb next to {type(attn).__name__}")
    return rope


def cached_keys(past: Any, layer: int) -> torch.Tensor | None:
    """Keys already in a dynamic cache for ``layer`` ``[B, h_kv, P, d]`` (None when empty)."""
    if past is None:
        return None
    if getattr(past, "is_compileable", False):
        raise IncompatibleFeatureError(
            "gift reads the cached keys of its enhancement layers; a static cache is not supported, use the "
            "default dynamic cache"
        )
    if past.get_seq_length(layer) == 0:
        return None
    return past.layers[layer].keys


def last_rows_probs(attn: torch.nn.Module, kwargs: dict[str, Any], n_rows: int,
                    layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(probabilities ``[B, H, n, K]`` of the forward's last ``n_rows`` rows, allowed ``[B, 1|H, n, K]`` bool or None
    when every key is allowed: a decode step without a mask).

    Query heads are grouped onto their KV head (no repeated keys), and the cached keys and the forward's own keys
    are scored separately (no copy of the cache): one step costs two small matmuls.
    """
    hidden = kwargs["hidden_states"]
    cos, sin = kwargs["position_embeddings"]
    if n_rows == hidden.shape[1]:  # a decode step: q and k of the same rows, one RoPE call
        q, k = rotated_pair(attn, hidden, cos, sin)
    else:
        q = rotated(attn, hidden[:, -n_rows:], attn.q_proj, cos[..., -n_rows:, :], sin[..., -n_rows:, :])
        k = rotated(attn, hidden, attn.k_proj, cos, sin)
    bsz, n_heads, n, d = q.shape
    n_kv = k.shape[1]
    qg = q.float().reshape(bsz, n_kv, (n_heads // n_kv) * n, d)                # query heads grouped on their KV head
    logits = qg @ k.float().transpose(-1, -2)                                   # [B, h_kv, g * n, q_len]
    past = cached_keys(kwargs.get("past_key_values"), layer)
    if past is not None:
        logits = torch.cat([qg @ past.float().transpose(-1, -2), logits], -1)
    logits = logits.view(bsz, n_heads, n, -1) * attn.scaling
    k_len = logits.shape[-1]
    mask = kwargs.get("attention_mask")
    if mask is None and n_rows == hidden.shape[1] == 1:
        return logits.softmax(-1), None
    allowed = allowed_rows(mask, hidden.shape[1], k_len, n_rows, hidden.device)
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return probs, allowed


def allowed_rows(mask: torch.Tensor | None, q_len: int, k_len: int, n_rows: int, device: torch.device) -> torch.Tensor:
    """Which keys the last ``n_rows`` query rows may see, from the layer's mask (None = causal, no padding)."""
    if mask is None:
        rows = torch.arange(q_len - n_rows, q_len, device=device) + (k_len - q_len)
        return (torch.arange(k_len, device=device)[None, :] <= rows[:, None])[None, None]
    m = mask[..., -n_rows:, :k_len]
    return m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2


def full_float_mask(mask: torch.Tensor | None, q_len: int, k_len: int, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """The layer's mask as an additive float mask ``[B|1, 1, Q, K]`` (0 = attend, dtype min = masked)."""
    allowed = allowed_rows(mask, q_len, k_len, q_len, device)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
