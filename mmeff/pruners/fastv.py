"""FastV: drop the visual tokens the last query attends to least at layer K-1 (ECCV'24 baseline)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..core.registry import register_method
from .base import PrunerConfig, ScoreView


@register_method
@dataclasses.dataclass(frozen=True)
class FastV(PrunerConfig):
    """Score = head-mean attention of the last (real) query token at layer K-1; K defaults to 2."""

    name: ClassVar[str] = "fastv"
    needs: ClassVar[frozenset[str]] = frozenset({"last_query_attention"})

    def default_layer(self, family: str) -> int:
        return 2

    def score(self, view: ScoreView) -> torch.Tensor:
        return view.last_query_attention().float().mean(0)
