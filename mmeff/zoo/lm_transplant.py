"""Start tiny-llava's language model from tiny-qwen2-vl's trained one (same tokenizer, same LM block).

Why: the from-scratch tiny-llava runs (64-wide LM) never got past chance on existence and
position even once its CLIP tower carried shape and position (per-patch shape accuracy 0.92,
position probe R^2 0.93-0.96): a narrow LM that must also learn the question language, the
look-up and the answers from scratch in CPU-minutes is the bottleneck. tiny-qwen2-vl's LM
already reads the world's questions and answers them from image features at 0.87. Both zoo
models share one word-level tokenizer, and a Qwen2 decoder layer is a Llama decoder layer
with q/k/v biases (``LlamaConfig(attention_bias=True)`` adds an o_proj bias, set to 0), and
for text tokens M-RoPE is ordinary RoPE. So the donor's embeddings, layers, final norm and
LM head copy over exactly, and extra layers (tiny-llava keeps 12 so in-LLM pruners can meet
budget 64) start as exact identities: a copy of the layer below with o_proj and down_proj
zeroed, so the residual stream passes through unchanged until training opens them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .lm_position_aux import decoder_layers


def donor_text_config(folder: str | Path) -> dict[str, Any]:
    """The LM shape of the saved model in ``folder``, as :func:`~mmeff.zoo.train_vlm.build_model`
    overrides (hidden, heads, kv_heads, layers, RMSNorm eps, q/k/v biases)."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    text = cfg.get("text_config") or cfg
    if text.get("intermediate_size") != 2 * text["hidden_size"]:
        raise ValueError(f"{folder}: the donor's MLP width must be 2 x hidden, as build_model makes it")
    return dict(hidden=text["hidden_size"], heads=text["num_attention_heads"], kv_heads=text["num_key_value_heads"],
                layers=text["num_hidden_layers"], rms_norm_eps=text.get("rms_norm_eps", 1e-6), attention_bias=True)


def identity_layer_plan(n_donor: int, n_target: int) -> list[int | None]:
    """Which donor layer each target layer copies (None: an identity layer), identities spread
    evenly after donor layers, e.g. 8 -> 12: [0, 1, None, 2, 3, None, 4, 5, None, 6, 7, None]."""
    if n_target < n_donor:
        raise ValueError(f"the target LM has {n_target} layers, fewer than the donor's {n_donor}")
    extra = n_target - n_donor
    plan: list[int | None] = []
    for d in range(n_donor):
        plan.append(d)
        # after donor layer d, insert as many identities as the even spread asks for so far
        while len(plan) - (d + 1) < (extra * (d + 1)) // n_donor:
            plan.append(None)
    return plan


@torch.no_grad()
def transplant_lm(model: Any, donor: Any) -> list[int | None]:
    """Copy ``donor``'s language model (embeddings, decoder layers, final norm, LM head) into
    ``model``'s, inserting identity layers where ``model`` is deeper; returns the layer plan."""
    src, dst = donor.model.language_model, model.model.language_model
    if src.embed_tokens.weight.shape != dst.embed_tokens.weight.shape:
        raise ValueError(f"embedding shapes differ: donor {tuple(src.embed_tokens.weight.shape)}, "
                         f"target {tuple(dst.embed_tokens.weight.shape)}; build the target with donor_text_config")
    dst.embed_tokens.weight.copy_(src.embed_tokens.weight)
    dst.norm.weight.copy_(src.norm.weight)
    model.lm_head.weight.copy_(donor.lm_head.weight)
    src_layers, dst_layers = decoder_layers(donor), decoder_layers(model)
    plan = identity_layer_plan(len(src_layers), len(dst_layers))
    last = 0
    for target, d in zip(dst_layers, plan):
        copy_from = src_layers[d if d is not None else last]
        state = dict(copy_from.state_dict())
        state.setdefault("self_attn.o_proj.bias", torch.zeros_like(target.self_attn.o_proj.bias))
        target.load_state_dict(state, strict=True)
        if d is None:  # an exact identity: neither sub-block writes to the residual stream
            target.self_attn.o_proj.weight.zero_()
            target.self_attn.o_proj.bias.zero_()
            target.mlp.down_proj.weight.zero_()
        else:
            last = d
    return plan
