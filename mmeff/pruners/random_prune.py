"""RandomPrune: a pre-LLM baseline that keeps a seeded uniform sample of each image's tokens."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..core.registry import register_method
from .base import PrunerConfig, ScoreView, Stage


@register_method
@dataclasses.dataclass(frozen=True)
class RandomPrune(PrunerConfig):
    """Uniformly random visual tokens, cut before the LLM (input-level budget). Reproducible by ``seed``."""

    name: ClassVar[str] = "random"
    stage: ClassVar[Stage] = "pre_llm"
    needs: ClassVar[frozenset[str]] = frozenset()
    seed: int = 0

    def score(self, view: ScoreView) -> torch.Tensor:
        return torch.rand(view.n_visual, generator=view.generator())
