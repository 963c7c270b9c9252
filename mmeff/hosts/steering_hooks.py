"""The VLM host's entry point for steering methods (hallucination mitigators), kind ``"mitigator"``.

Kept apart from the pruning machinery in :mod:`.vlm_base`: the host only says *where* things are (layers,
``o_proj``, the language model, the image token) and each mitigator installs its own hooks. The host
installs steering after any pruner, so a mitigator's hooks see only the tokens that survive it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..core.errors import ConfigError
from ..core.hooks import HookSet

if TYPE_CHECKING:  # pragma: no cover
    from ..core.config import MethodConfig
    from .vlm_base import VLMAdapter

MITIGATOR = "mitigator"


def install_mitigators(adapter: "VLMAdapter", methods: list["MethodConfig"], hooks: HookSet) -> None:
    """Install one mitigator on the adapter's model; its runtime joins ``adapter.steering`` (for the report)."""
    if len(methods) != 1:
        raise ConfigError(f"apply at most one mitigator to a VLM at a time, got {[m.name for m in methods]}")
    runtime: Any = methods[0].install(adapter, hooks)  # type: ignore[attr-defined]
    adapter.steering.append(runtime)


def register() -> None:
    """Register :func:`install_mitigators` as the VLM handler of kind ``"mitigator"``."""
    from .vlm_base import register_vlm_handler

    register_vlm_handler(MITIGATOR)(install_mitigators)
