"""Prefill FLOPs of a decoder-only LLM given the tokens each layer processes (for reports)."""
from __future__ import annotations

from typing import Any


def layer_flops(cfg: Any, n_tokens: float) -> float:
    """Multiply-add FLOPs (x2) of one decoder layer over ``n_tokens`` tokens with causal attention."""
    d = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", heads) or heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    ff = cfg.intermediate_size
    proj = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2          # q, o and k, v
    mlp = 3 * d * ff                                                        # gated MLP
    attn = 2 * n_tokens * heads * head_dim                                  # QK^T and PV per token (full rows)
    return 2.0 * n_tokens * (proj + mlp + attn)


def prefill_flops(cfg: Any, tokens_per_layer: list[float]) -> float:
    return sum(layer_flops(cfg, n) for n in tokens_per_layer)
