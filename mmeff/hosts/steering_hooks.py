"""The VLM host's one entry point for steering methods (hallucination mitigators).

Kept apart from the pruning machinery in :mod:`.vlm_base`: the host only says *where* things are
(layers, ``o_proj``, the language model, the image token) and the mitigator installs its own hooks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..core.hooks import HookSet

if TYPE_CHECKING:  # pragma: no cover
    from ..core.config import MethodConfig
    from .vlm_base import VLMAdapter

MITIGATOR = "mitigator"


def install(method: "MethodConfig", adapter: "VLMAdapter", hooks: HookSet) -> Any:
    """Install a mitigator on the adapter's model (after any pruner); returns its runtime (``report()``)."""
    return method.install(adapter, hooks)
