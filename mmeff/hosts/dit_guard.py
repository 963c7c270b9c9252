"""Checks that keep the DiT adapter honest next to diffusers' own features (never silently off).

- :func:`replaced_sites` / :func:`replacement_error`: a wrapped attention processor that diffusers or the user
  replaced after ``mmeff.apply`` (``set_attn_processor``, ``set_default_attn_processor``,
  ``fuse_qkv_projections``, ``load_ip_adapter`` ...). mmeff refuses at the next forward instead of re-wrapping:
  the new processor is the user's explicit choice, it may not call SDPA at all (PixArt's default
  ``AttnProcessor``), and guessing whether the user meant to switch mmeff off is worse than saying so.
- :func:`scrub_saved_processors`: diffusers keeps the processors it replaced in ``original_attn_processors``
  (``fuse_qkv_projections``) and reinstalls them on ``unfuse_qkv_projections``; at remove every mmeff wrapper
  there is swapped for its inner processor, so nothing of mmeff comes back.
- :func:`calling_pipeline`: the pipeline whose ``__call__`` is calling the transformer right now, so a
  transformer shared by two pipelines is never driven by the other pipeline's CFG flag and step count.
- :func:`pag_sites`: the attention modules a diffusers PAG pipeline swaps on every call (``pag_applied_layers``);
  mmeff cannot share those, so the adapter refuses them at apply (an error raised mid-call would leave the
  PAG processors installed, since the pipeline restores its processors only when the call completes).
- :func:`active_caches`: diffusers' attention/block caches (PAB, FasterCache, FirstBlockCache, ...) keep one
  batch layout per call; guidance that appends batch rows is refused next to them.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import torch

from .dit_sdpa import is_wrapper, unwrap

# Diffusers hook names (hooks/*.py) are "<technique>..." strings; caches all say "cache" except PAB.
_CACHE_HOOK_WORDS = ("cache", "pyramid_attention_broadcast")


def replaced_sites(installed: dict[str, tuple[torch.nn.Module, Any]]) -> list[str]:
    """Names of the sites whose module no longer holds the wrapper mmeff installed."""
    return [name for name, (module, wrapper) in installed.items() if module.processor is not wrapper]


def likely_call(new: Any, original: Any) -> str:
    """The diffusers call that most likely installed ``new`` in place of mmeff's wrapper of ``original``."""
    name, before = type(new).__name__, type(original).__name__
    if "IPAdapter" in name:
        return "load_ip_adapter()"
    if "IPAdapter" in before:
        return "unload_ip_adapter()"
    if name.startswith("PAG"):
        return "the pipeline's own perturbed-attention guidance (PAG pipelines swap processors on every call)"
    if name.startswith("XFormers"):
        return "enable_xformers_memory_efficient_attention()"
    if name.startswith("Fused"):
        return "fuse_qkv_projections()"
    if before.startswith("Fused"):
        return "unfuse_qkv_projections()"
    return "set_attn_processor() or set_default_attn_processor()"


def replacement_error_message(names: list[str], installed: dict[str, tuple[torch.nn.Module, Any]],
                              originals: dict[str, Any], n_wrapped: int) -> str:
    first = names[0]
    new = installed[first][0].processor
    call = likely_call(new, originals[first])
    return (f"mmeff: the attention processor of {first} ({len(names)} of {n_wrapped} wrapped sites) was replaced "
            f"after mmeff.apply, by {call} (now {type(new).__name__}); mmeff's methods would be silently off there. "
            "Apply mmeff after it, or remove() first")


def scrub_saved_processors(model: torch.nn.Module) -> None:
    """Replace mmeff wrappers in diffusers' saved processor dict by their inner processors."""
    saved = getattr(model, "original_attn_processors", None)
    if isinstance(saved, dict):
        for key, proc in list(saved.items()):
            if is_wrapper(proc):
                saved[key] = unwrap(proc)


def calling_pipeline(model: torch.nn.Module, max_frames: int = 64) -> Any | None:
    """The innermost object on the call stack whose ``__call__`` is running and whose ``.transformer`` is ``model``.

    Stock pipelines call their transformer from ``__call__``; a transformer called directly or from a custom
    loop has no such frame (None).
    """
    frame = sys._getframe(1)
    for _ in range(max_frames):
        if frame is None:
            return None
        if frame.f_code.co_name == "__call__" and frame.f_code.co_varnames[:1] == ("self",):
            owner = frame.f_locals.get("self")
            if owner is not model and getattr(owner, "transformer", None) is model:
                return owner
        frame = frame.f_back
    return None


def active_caches(model: torch.nn.Module, modules: Iterable[torch.nn.Module]) -> list[str]:
    """Diffusers cache techniques enabled on ``model`` (``enable_cache``) or hooked onto it or ``modules``."""
    found: list[str] = []
    config = getattr(model, "_cache_config", None)
    if config is not None:
        found.append(type(config).__name__)
    for module in (model, *modules):
        registry = module.__dict__.get("_diffusers_hook")  # a plain attribute; nn.Module getattr misses are slow
        for name in getattr(registry, "hooks", {}) or {}:
            if any(w in name for w in _CACHE_HOOK_WORDS) and name not in found:
                found.append(name)
    return found


def pag_sites(pipe: Any, model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules of ``model`` that the PAG pipeline ``pipe`` replaces processors of on each call.

    Asked of diffusers itself: its own layer matcher runs once on the live model and every processor is put back
    right away, so the answer follows whatever rule the installed diffusers uses.
    """
    setter = getattr(pipe, "_set_pag_attn_processor", None)
    layers = getattr(pipe, "pag_applied_layers", None)
    if setter is None or not layers:
        return []
    before = [(m, m.processor) for m in model.modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]
    try:
        setter(layers, do_classifier_free_guidance=True)
    except ValueError:  # no PAG processors configured, or a layer id that matches nothing
        return []
    finally:
        changed = [m for m, proc in before if m.processor is not proc]
        for m, proc in before:
            if m.processor is not proc:
                m.processor = proc
    return changed
