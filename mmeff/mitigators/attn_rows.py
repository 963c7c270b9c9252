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
    rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if rope is None:
        raise UnsupportedModelError(f"cannot find apply_rotary_pos_emb next to {type(attn).__name__}")
    return rope(x, x, cos, sin)[0]


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


def last_rows_probs(attn: torch.nn.Module, kwargs: dict[str, Any], n_rows: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities ``[B, H, n, K]`` of the forward's last ``n_rows`` rows, allowed ``[B, 1|H, n, K]`` bool)."""
    hidden = kwargs["hidden_states"]
    cos, sin = kwargs["position_embeddings"]
    q = rotated(attn, hidden[:, -n_rows:], attn.q_proj, cos[..., -n_rows:, :], sin[..., -n_rows:, :])
    k = rotated(attn, hidden, attn.k_proj, cos, sin)
    past = cached_keys(kwargs.get("past_key_values"), layer)
    if past is not None:
        k = torch.cat([past.to(k.dtype), k], 2)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = torch.einsum("bhnd,bhkd->bhnk", q.float(), k.float()) * attn.scaling
    allowed = allowed_rows(kwargs.get("attention_mask"), hidden.shape[1], k.shape[2], n_rows, hidden.device)
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
