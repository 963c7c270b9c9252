"""Pruners used only by the plugin tests; vLLM's processes import this module via MMEFF_VLLM_IMPORTS."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from mmeff.core.registry import get_method, register_method
from mmeff.pruners.base import PrunerConfig, ScoreView, Stage


@dataclasses.dataclass(frozen=True)
class FeatureNorm(PrunerConfig):
    """Keeps the image tokens whose projected features have the largest L2 norm (deterministic, pre-LLM)."""

    name: ClassVar[str] = "test_featnorm"
    stage: ClassVar[Stage] = "pre_llm"

    def score(self, view: ScoreView) -> torch.Tensor:
        return view.features().float().norm(dim=-1)


@dataclasses.dataclass(frozen=True)
class FixedIndices(PrunerConfig):
    """Keeps the listed visual indices of the (single) image: a frozen decision given from outside."""

    name: ClassVar[str] = "test_fixed_indices"
    stage: ClassVar[Stage] = "pre_llm"
    indices: tuple[int, ...] = ()

    def score(self, view: ScoreView) -> torch.Tensor:
        s = torch.zeros(view.n_visual)
        s[list(self.indices)] = 1.0
        return s


for _cls in (FeatureNorm, FixedIndices):
    try:
        get_method(_cls.name)
    except KeyError:
        register_method(_cls)
