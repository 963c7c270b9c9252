"""Refuse, before anything runs, the generate() options that pruning cannot serve exactly yet.

The guard is an instance attribute wrapping the model's own ``generate`` (undone by ``handle.remove()``);
it reads the options only and changes nothing else.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from ..core.errors import IncompatibleFeatureError
from ..core.hooks import HookSet
from ..pruners.base import PrunerConfig

SUPPORTED_CACHES = (None, "dynamic", "static")


def check_generate_options(model: torch.nn.Module, pruner: PrunerConfig, kwargs: dict[str, Any]) -> None:
    """Raise one clear error for an option that would run under pruning but not exactly."""
    config = kwargs.get("generation_config") or model.generation_config

    def option(name: str) -> Any:
        return kwargs[name] if name in kwargs else getattr(config, name, None)

    if option("prefill_chunk_size") is not None:
        raise IncompatibleFeatureError(
            f"{pruner.name}: generate(prefill_chunk_size=...) splits the prompt, but the pruning decision needs the "
            "whole prompt; pass prefill_chunk_size=None while pruning is applied"
        )
    cache = option("cache_implementation")
    if cache not in SUPPORTED_CACHES:
        raise IncompatibleFeatureError(
            f"{pruner.name}: cache_implementation={cache!r} is not supported under pruning; use 'static' (the "
            "torch.compile path) or the default dynamic cache"
        )
    if option("is_assistant") and pruner.stage == "pre_llm":
        raise IncompatibleFeatureError(
            f"{pruner.name}: pre-LLM pruning cannot run inside an assistant model (transformers re-syncs the "
            "assistant's cache by its full length, which a pruned cache does not have); apply the pruner to the "
            "main model only"
        )


def install_generate_guard(hooks: HookSet, model: torch.nn.Module, pruner: PrunerConfig) -> None:
    original = model.generate

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        check_generate_options(model, pruner, kwargs)
        return original(*args, **kwargs)

    hooks.set_attr(model, "generate", generate)
    hooks.set_attr(model, "create_masks_for_generate", keep_padding_mask)


def keep_padding_mask(*, attention_mask: torch.Tensor | None = None, past_key_values: Any = None,
                      **_: Any) -> torch.Tensor | None:
    """Hand the model the 2-D padding mask where generate() would precompute a 4-D one (compileable caches).

    generate() builds that mask from the cache's own length, which pre-LLM pruning shortens; the pruning hooks
    read the prompt's padding from the 2-D mask. The model builds the 4-D mask itself, inside the (compiled)
    forward. The mask is zero-padded to the static cache's size, so every decode step has the same shapes
    (one compiled graph, CUDA graphs replayable) and nothing is read back from the device.
    """
    if attention_mask is None or attention_mask.dim() != 2 or not getattr(past_key_values, "is_compileable", False):
        return attention_mask
    slots = past_key_values.layers[0].get_max_length()
    if attention_mask.shape[-1] >= slots:
        return attention_mask
    return torch.nn.functional.pad(attention_mask, (0, slots - attention_mask.shape[-1]))
