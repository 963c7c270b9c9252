"""Hallucination mitigators: method configs that steer attention heads, decided at prefill, frozen for decode.

A mitigator is applied by the VLM host next to (at most) one pruner: the host installs the pruner's hooks
first, then calls :meth:`MitigatorConfig.install`, so the mitigator's per-layer hooks see exactly the tokens
that survive the pruner (DESIGN.md, "Steering" and "Composition").
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

from ..core.config import MethodConfig
from ..core.hooks import HookSet

if TYPE_CHECKING:  # pragma: no cover
    from ..hosts.vlm_base import VLMAdapter

from ..hosts.steering_hooks import MITIGATOR


@dataclasses.dataclass(frozen=True)
class MitigatorConfig(MethodConfig):
    """Base config of a hallucination mitigator (``kind = "mitigator"``)."""

    kind: ClassVar[str] = MITIGATOR

    def install(self, adapter: "VLMAdapter", hooks: HookSet) -> Any:
        """Install this method's hooks on the adapter's model; returns a runtime with ``report()``."""
        raise NotImplementedError  # abstract: each mitigator installs its own hooks


def scaled_layers(n_layers: int, first: tuple[int, ...], last: int, of: int) -> tuple[int, ...]:
    """A paper layer set ``first ∪ {last `last` of `of` layers}`` scaled to a model with ``n_layers`` layers.

    E.g. VHR's ``{1} ∪ last 14 of 32`` becomes ``{1} ∪ last round(14/32 * n)`` (12 layers: {1, 7..11}).
    """
    tail = max(1, round(last * n_layers / of))
    return tuple(sorted({i for i in first if i < n_layers} | set(range(n_layers - tail, n_layers))))
