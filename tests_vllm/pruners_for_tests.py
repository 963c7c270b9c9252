"""Pruners used only by the plugin tests; vLLM's processes import this module via MMEFF_VLLM_IMPORTS."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from mmeff.core.registry import get_method, register_method
from mmeff.pruners.base import PrunerConfig, ScoreView, Stage


@dataclasses.dataclass(frozen=True)
class FeatureNorm(PrunerConfig):
    """Keeps the image tokens whose projected features have the largest L2 norm (deterministic, pre-LLM).

    Flat background patches give identical features, so many norms tie exactly, and vLLM's and transformers'
    features differ in the last bits: a raw-norm ranking then picks different background tokens in the two
    engines. The norm is rounded to 0.01 and ties go to the lower index, so both engines keep the same tokens
    (the score is an exact float32 integer, rounded norm x N - index, for norms below 2^24 / (100 N))."""

    name: ClassVar[str] = "test_featnorm"
    stage: ClassVar[Stage] = "pre_llm"

    def score(self, view: ScoreView) -> torch.Tensor:
        norm = view.features().double().norm(dim=-1)
        index = torch.arange(norm.numel(), dtype=torch.float64, device=norm.device)
        return (torch.round(norm * 100) * norm.numel() - index).float()


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
