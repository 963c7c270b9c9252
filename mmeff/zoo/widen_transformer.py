"""Double a trained ``WanTransformer3DModel``'s width (hidden size and heads) without changing what it computes.

Why: tiny-wan's transformer grew deeper twice (:mod:`mmeff.zoo.grow_transformer`); its hidden size (64, 4 heads of
16) stayed. Growing the width from scratch would throw away the CPU hours already spent, so the trained model is
widened in place, Net2WiderNet-style (Chen et al., 2016):

- every hidden channel is duplicated: the residual stream of the wide model is ``[h, h]``. A LayerNorm or an
  RMSNorm over ``[h, h]`` has the same mean and variance as over ``h``, so the non-affine norms (``norm1``,
  ``norm3``, ``norm_out``) and the across-heads q/k RMSNorms are unchanged; their affine weights are duplicated;
- the attention heads are duplicated (4 → 8 of the same head size): each new head is a copy of an old one, so the
  rotary embedding and the softmax scale are unchanged;
- a layer that *writes* hidden channels duplicates its output rows; a layer that *reads* them splits each input
  weight ``w`` into ``r w`` and ``(1 - r) w`` over the two copies, with ``r`` drawn uniformly from [0.25, 0.75].
  The sum is ``w``, so the function is the same; the random split makes the two copies' gradients differ, so
  training can pull them apart (an even split would keep them identical forever).

The FFN's hidden width is kept (it reads and writes hidden channels only at its ends).
"""
from __future__ import annotations

from typing import Any

import torch

SPLIT_RANGE = (0.25, 0.75)


def _dup_rows(w: torch.Tensor) -> torch.Tensor:
    return torch.cat([w, w], dim=0)


def _split_cols(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    lo, hi = SPLIT_RANGE
    r = lo + (hi - lo) * torch.rand(w.shape, generator=gen, dtype=w.dtype)
    return torch.cat([w * r, w * (1 - r)], dim=1)


def _dup_last(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, t], dim=-1)


def _widen_time_proj(w: torch.Tensor, b: torch.Tensor, dim: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``time_proj`` writes 6 modulation vectors of ``dim`` each: duplicate within each of the 6 chunks."""
    w6 = w.reshape(6, dim, w.shape[1])
    w_wide = torch.cat([w6, w6], dim=1).reshape(12 * dim, w.shape[1])
    b6 = b.reshape(6, dim)
    return _split_cols(w_wide, gen), torch.cat([b6, b6], dim=1).reshape(12 * dim)


def widened_state(state: dict[str, torch.Tensor], dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of the width-doubled model, from the trained ``state`` of hidden size ``dim``."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    reads = ("time_embedder.linear_2", "text_embedder.linear_2", ".to_q", ".to_k", ".to_v", ".to_out.0")
    writes_only = ("patch_embedding", "time_embedder.linear_1", "text_embedder.linear_1", "ffn.net.2")
    affine_norms = ("norm_q", "norm_k", "norm2")  # over hidden channels: their weights follow the duplication
    for name, t in state.items():
        base, _, kind = name.rpartition(".")
        if name == "condition_embedder.time_proj.weight":
            out[name], out["condition_embedder.time_proj.bias"] = _widen_time_proj(
                t, state["condition_embedder.time_proj.bias"], dim, gen)
        elif name == "condition_embedder.time_proj.bias":
            continue
        elif kind == "scale_shift_table":
            out[name] = _dup_last(t)
        elif any(base.endswith(s) for s in reads):  # hidden -> hidden
            out[name] = _split_cols(_dup_rows(t), gen) if kind == "weight" else _dup_rows(t)
        elif any(base.endswith(s) for s in writes_only + affine_norms):  # other -> hidden, or norm weights
            out[name] = _dup_rows(t)
        elif base.endswith("ffn.net.0.proj") or base == "proj_out":  # hidden -> other
            out[name] = _split_cols(t, gen) if kind == "weight" else t.clone()
        else:
            raise ValueError(f"widen_wan_transformer: no rule for parameter {name} {tuple(t.shape)}")
    return out


@torch.no_grad()
def widen_wan_transformer(transformer: Any, seed: int = 0) -> Any:
    """A ``WanTransformer3DModel`` with twice the heads (same head size), so twice the hidden size, that computes
    the same function as ``transformer`` up to float rounding. Every other config value is kept."""
    from diffusers import WanTransformer3DModel

    cfg = transformer.config
    if cfg.get("added_kv_proj_dim") is not None or cfg.get("image_dim") is not None:
        raise ValueError("widen_wan_transformer: image-conditioned Wan transformers (added K/V) are not supported")
    if cfg.get("qk_norm") not in (None, "rms_norm_across_heads"):
        raise ValueError(f"widen_wan_transformer: qk_norm {cfg['qk_norm']!r} is not supported")
    dim = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    config = {k: v for k, v in cfg.items() if not k.startswith("_")}
    config["num_attention_heads"] = 2 * int(cfg["num_attention_heads"])
    wide = WanTransformer3DModel(**config)
    wide.load_state_dict(widened_state(transformer.state_dict(), dim, seed), strict=True)
    return wide.to(dtype=next(transformer.parameters()).dtype)
