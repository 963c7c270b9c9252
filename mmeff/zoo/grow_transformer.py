"""Grow a trained ``WanTransformer3DModel`` deeper and its feed-forward wider without changing what it computes.

Why: tiny-wan's transformer (4 blocks, FFN 256) stopped improving on layout videos, and training a bigger one
from scratch on a CPU would throw away hours of training. A grown copy starts at exactly the trained model's
function and only adds capacity:

- **new blocks** are interleaved with the old ones. Their three output projections (self-attention,
  cross-attention, FFN) are zero, so each new block is the identity on its residual stream until trained. The
  rest of a new block is freshly initialised, so the output projections get non-zero gradients at once.
- **wider FFNs** in the old blocks keep their trained hidden units; the added units have fresh input weights and
  zero output weights.

This is the function-preserving growth of Net2Net (Chen et al., 2016) with zero-initialised residual branches.
"""
from __future__ import annotations

from typing import Any

import torch

GROWN_CONFIG_KEYS = ("num_layers", "ffn_dim", "num_attention_heads")


def arch_of(transformer: Any) -> dict[str, int]:
    """The dimensions a Wan transformer is grown in: ``{"num_layers", "ffn_dim", "num_attention_heads"}`` (the
    last by :mod:`mmeff.zoo.widen_transformer`)."""
    return {k: int(transformer.config[k]) for k in GROWN_CONFIG_KEYS}


def old_block_positions(old_layers: int, new_layers: int) -> list[int]:
    """Where the old blocks go among ``new_layers``: spread evenly, first block first (0, 2, 4, ... at 2x)."""
    if new_layers < old_layers:
        raise ValueError(f"cannot shrink a transformer from {old_layers} to {new_layers} blocks")
    return [i * new_layers // old_layers for i in range(old_layers)]


def _zero_residual_outputs(block: torch.nn.Module) -> None:
    for lin in (block.attn1.to_out[0], block.attn2.to_out[0], block.ffn.net[2]):
        torch.nn.init.zeros_(lin.weight)
        if lin.bias is not None:
            torch.nn.init.zeros_(lin.bias)


def _copy_widened_ffn(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Copy ``src``'s FFN into the wider ``dst``: the first hidden units are the trained ones, the rest read
    freshly initialised input weights and write through zero output weights."""
    w_in, b_in = src.ffn.net[0].proj.weight, src.ffn.net[0].proj.bias
    w_out, b_out = src.ffn.net[2].weight, src.ffn.net[2].bias
    hidden = w_in.shape[0]
    d_in, d_out = dst.ffn.net[0].proj, dst.ffn.net[2]
    d_in.weight[:hidden] = w_in
    d_in.bias[:hidden] = b_in
    d_out.weight.zero_()
    d_out.weight[:, :hidden] = w_out
    d_out.bias.copy_(b_out)


@torch.no_grad()
def grow_wan_transformer(transformer: Any, num_layers: int, ffn_dim: int, seed: int = 0) -> Any:
    """A ``WanTransformer3DModel`` with ``num_layers`` blocks and FFN width ``ffn_dim`` that computes the same
    function as ``transformer`` (up to float rounding). Every other config value is kept."""
    from diffusers import WanTransformer3DModel

    old = arch_of(transformer)
    if ffn_dim < old["ffn_dim"]:
        raise ValueError(f"cannot narrow the FFN from {old['ffn_dim']} to {ffn_dim}")
    positions = old_block_positions(old["num_layers"], num_layers)
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    config.update(num_layers=num_layers, ffn_dim=ffn_dim)
    torch.manual_seed(seed)
    grown = WanTransformer3DModel(**config)
    # everything outside the blocks (patch embedding, condition embedder, output norm and projection) is copied
    outside = {k: v for k, v in transformer.state_dict().items() if not k.startswith("blocks.")}
    result = grown.load_state_dict(outside, strict=False)
    if result.unexpected_keys or any(not k.startswith("blocks.") for k in result.missing_keys):
        raise RuntimeError(f"grown transformer does not match the source outside its blocks: {result}")
    placed = set(positions)
    for i, pos in enumerate(positions):
        src, dst = transformer.blocks[i], grown.blocks[pos]
        state = {k: v for k, v in src.state_dict().items() if not k.startswith("ffn.")}
        result = dst.load_state_dict(state, strict=False)
        if result.unexpected_keys or any(not k.startswith("ffn.") for k in result.missing_keys):
            raise RuntimeError(f"block {i} does not match its grown copy: {result}")
        _copy_widened_ffn(src, dst)
    for pos, block in enumerate(grown.blocks):
        if pos not in placed:
            _zero_residual_outputs(block)
    return grown
