"""Which mmeff spec strings a vLLM deployment can serve, checked before any model is built.

vLLM fixes the number of image placeholders when it processes a prompt, before the LLM runs, so only
*pre-LLM* pruners with a fixed budget fit. In-LLM pruners (FastV, EntropyPrune, ...) would have to cut the
KV cache inside the running batch, which vLLM gives plugins no way to do. This module imports no vLLM, so
its checks run (and are tested) anywhere mmeff runs.
"""
from __future__ import annotations

from ...core.errors import ConfigError, UnknownMethodError
from ...core.registry import parse_method
from ...pruners.base import PrunerConfig

SPEC_KEY = "mmeff_prune"
"""The ``hf_overrides`` key (an attribute of the served model's HF config) that carries the spec string."""

_POSITIONS = {"llava": "reindex", "qwen2_vl": "original"}
_POSITIONS_WHY = {
    "llava": "vLLM's LLaVA numbers the kept tokens contiguously",
    "qwen2_vl": "vLLM's Qwen2-VL keeps each kept token's original M-RoPE (t, h, w) position",
}


def parse_serving_spec(spec: str | None, family: str) -> PrunerConfig | None:
    """The pruner a spec string asks vLLM to run on ``family`` ("llava" or "qwen2_vl"); None serves dense.

    Raises one :class:`ConfigError` line naming the cause and the fix for anything vLLM cannot serve:
    an unknown or malformed spec, a method that is not a visual-token pruner, an in-LLM pruner, a
    relative budget (``ratio=``), or a ``positions=`` that the vLLM model cannot honour.
    """
    if spec is None or not str(spec).strip():
        return None
    if family not in _POSITIONS:
        raise ConfigError(f"mmeff's vLLM plugin serves {sorted(_POSITIONS)}, not {family!r}")
    try:
        method = parse_method(str(spec))
    except (ConfigError, UnknownMethodError) as e:
        raise ConfigError(f"{SPEC_KEY}={spec!r}: {e}") from None
    if not isinstance(method, PrunerConfig):
        raise ConfigError(
            f"{SPEC_KEY}={spec!r}: {method.name} is not a visual-token pruner; the vLLM plugin serves "
            "pre-LLM pruners only (e.g. 'random:budget=64,positions=reindex')"
        )
    if method.stage != "pre_llm":
        raise ConfigError(
            f"{SPEC_KEY}={spec!r}: {method.name} prunes inside the LLM (layer K), which vLLM cannot do "
            "(its KV cache and batch layout are fixed before the LLM runs); serve a pre-LLM pruner such as "
            "'random:budget=64', or run this method with mmeff.apply on a transformers model"
        )
    if method.ratio is not None:
        raise ConfigError(
            f"{SPEC_KEY}={spec!r}: ratio= is not served because vLLM reserves the placeholder count per image "
            "size up front; give budget=N or keep=N (visual tokens entering the LLM per image)"
        )
    want = _POSITIONS[family]
    if method.positions != want:
        raise ConfigError(
            f"{SPEC_KEY}={spec!r}: {_POSITIONS_WHY[family]}, so add positions={want} "
            f"(mmeff.apply with the same spec gives the same tokens)"
        )
    return method


def kept_per_image(pruner: PrunerConfig | None, n_visual: int, n_layers: int) -> int:
    """Image placeholders (and embeddings) one image of ``n_visual`` dense tokens gets under ``pruner``."""
    if pruner is None:
        return n_visual
    return pruner.keep_count(n_visual, n_layers, 0)
