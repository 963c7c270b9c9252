"""AdaptInfer (arXiv 2508.06084): progressive text-guided pruning at a few LLM layers, with a text-to-text prior.

At each pruning layer l the text tokens after the image score the visual tokens: a soft prior w (text-to-text
attention, symmetrised) weights their text-to-vision attention, summed over heads; the top tokens of each image
survive into layer l + 1 (a cut at K = l + 1 in mmeff's plan, see ``adaptinfer_math``). Only the text rows of the
attention are computed, from layer l's q/k, so SDPA stays on. Schedules: the released ones scaled to the model's
depth, explicit ``layers=``/``keeps=``/``ratios=``, or a file from ``mmeff calibrate adaptinfer``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar

import torch

from ..core.config import require
from ..core.errors import BudgetError, ConfigError
from ..core.registry import register_method
from . import adaptinfer_math as am
from .base import PrunerConfig, ScoreView

LLAVA_FAMILIES = ("llava", "llava_next")


@register_method
@dataclasses.dataclass(frozen=True)
class AdaptInfer(PrunerConfig):
    """Options beyond the common pruner ones (give one of budget=, ratio=, keeps= or ratios=):

    layers:  AdaptInfer's pruning layers l (the cut is applied to layer l's output), e.g. ``layers=1;10;20``.
             Default: the released schedule scaled to this depth (LLaVA [1, 10, 20] of 32; Qwen2-VL (0, 9, 19) of 28),
             or the ``schedule=`` file's layers.
    keeps:   visual tokens per image kept after each pruning layer, e.g. ``keeps=290;72;18`` (the released rows).
    ratios:  cumulative keep ratios per pruning layer (Qwen2-VL's release: ``ratios=0.17;0.6;0.3``).
    budget_convention: what budget= means: "layer_average" (mmeff's, the mean over all layers of the visual tokens
             each layer processes; comparable with FastV/EntropyPrune) or "equal_token" (the paper's count, where a
             pruning layer counts its output; with it, budget=128/64/48/32 on LLaVA-1.5-7B gives the released rows).
             report() gives both.
    schedule: a JSON written by ``mmeff calibrate adaptinfer`` (its ``layers`` replace the default layers).
    lb:      mix of the text-to-text prior toward its mean (1 = none, the released default).
    recycle: SparseVLM-style recycling (off, as in the released code): the top ``recycle_ratio`` of the pruned
             tokens by score are clustered with k-means into n/10 + 1 groups; each group's mean hidden state
             survives in the slot (and RoPE position) of its best-scored member.
    """

    name: ClassVar[str] = "adaptinfer"
    needs: ClassVar[frozenset[str]] = frozenset({"text_rows_attention"})

    layers: tuple[int, ...] | None = None
    keeps: tuple[int, ...] | None = None
    ratios: tuple[float, ...] | None = None
    budget_convention: str = "layer_average"
    schedule: str | None = None
    lb: float = 1.0
    recycle: bool = False
    recycle_ratio: float = 0.3
    seed: int = 0

    def validate(self) -> None:
        given = [f"{k}=" for k in ("budget", "ratio", "keeps", "ratios") if getattr(self, k) is not None]
        require(len(given) == 1,
                "adaptinfer: give exactly one of budget= (e.g. budget=64), ratio= (e.g. ratio=0.11), keeps= (e.g. "
                f"keeps=290;72;18) or ratios= (e.g. ratios=0.17;0.6;0.3); got {' and '.join(given) or 'none'}")
        require(self.keep is None, "adaptinfer cuts several times; use keeps=a;b;c (tokens kept after each cut)")
        require(self.layer is None, "adaptinfer: use layers=l1;l2;l3 (its pruning layers), not layer=")
        require(self.budget is None or self.budget >= 0, f"adaptinfer: budget must be >= 0, got {self.budget}")
        require(self.ratio is None or 0.0 <= self.ratio <= 1.0, f"adaptinfer: ratio must be in [0, 1], got {self.ratio}")
        require(self.positions in ("original", "reindex"),
                f"adaptinfer: positions must be 'original' or 'reindex', got {self.positions!r}")
        require(self.budget_convention in ("layer_average", "equal_token"),
                f"adaptinfer: budget_convention must be 'layer_average' or 'equal_token', got {self.budget_convention!r}")
        if self.layers is not None:
            require(len(self.layers) > 0 and all(b > a for a, b in zip(self.layers, self.layers[1:]))
                    and self.layers[0] >= 0, f"adaptinfer: layers must be increasing and >= 0, got {list(self.layers)}")
        if self.keeps is not None:
            require(all(k >= 0 for k in self.keeps) and all(b <= a for a, b in zip(self.keeps, self.keeps[1:])),
                    f"adaptinfer: keeps must be >= 0 and non-increasing, got {list(self.keeps)}")
        if self.ratios is not None:
            require(all(0.0 < r <= 1.0 for r in self.ratios), f"adaptinfer: ratios must be in (0, 1], got {list(self.ratios)}")
        require(0.0 <= self.lb <= 1.0, f"adaptinfer: lb must be in [0, 1], got {self.lb}")
        require(0.0 < self.recycle_ratio <= 1.0, f"adaptinfer: recycle_ratio must be in (0, 1], got {self.recycle_ratio}")
        if self.schedule is not None and not Path(self.schedule).is_file():
            raise ConfigError(f"adaptinfer: schedule file {self.schedule!r} not found; create it with "
                              "`mmeff calibrate adaptinfer --model ... --out FILE`")

    # --- the plan ---------------------------------------------------------------------------------------------
    def pruning_layers(self, family: str, n_layers: int) -> tuple[int, ...]:
        """AdaptInfer's pruning layers l for this model (the cuts are at l + 1)."""
        if self.layers is not None:
            layers = tuple(self.layers)
        elif self.schedule is not None:
            data = json.loads(Path(self.schedule).read_text())
            if data.get("method") != "adaptinfer" or "layers" not in data:
                raise ConfigError(f"adaptinfer: {self.schedule!r} is not an adaptinfer schedule (no 'layers'); "
                                  "write one with `mmeff calibrate adaptinfer`")
            if int(data.get("n_layers", n_layers)) != n_layers:
                raise ConfigError(f"adaptinfer: schedule {self.schedule!r} was calibrated on a {data['n_layers']}-layer "
                                  f"LLM, this one has {n_layers}; calibrate this model")
            layers = tuple(int(x) for x in data["layers"])
        elif family in LLAVA_FAMILIES:
            layers = am.scale_layers(am.LLAVA_LAYERS, am.LLAVA_DEPTH, n_layers)
        else:
            layers = am.scale_layers(am.QWEN_LAYERS, am.QWEN_DEPTH, n_layers)
        if layers[-1] + 1 >= n_layers:
            raise BudgetError(f"adaptinfer: pruning layer {layers[-1]} leaves no layer to prune (the LLM has "
                              f"{n_layers} layers); use layers= below {n_layers - 1}")
        n_given = len(self.keeps or self.ratios or layers)
        if n_given != len(layers):
            raise ConfigError(f"adaptinfer: {n_given} keep entries for the {len(layers)} pruning layers {list(layers)}")
        return layers

    def plan_layers(self, family: str, n_layers: int) -> tuple[int, ...]:
        return tuple(l + 1 for l in self.pruning_layers(family, n_layers))

    def keep_schedule(self, n_visual: int, n_layers: int, layers: tuple[int, ...], family: str = "llava") -> list[int]:
        if self.keeps is not None:
            if self.keeps[0] > n_visual:
                raise BudgetError(f"adaptinfer: keeps={list(self.keeps)} asks for more than the {n_visual} visual "
                                  f"tokens of this image; use keeps <= {n_visual} or ratios=")
            return list(self.keeps)
        if self.ratios is not None:  # the Qwen2-VL release: at least one token per cut
            out: list[int] = []
            for r in self.ratios:
                prev = out[-1] if out else n_visual
                out.append(max(1, min(int(r * prev), prev)) if prev else 0)
            return out
        budget = self.budget if self.budget is not None else self.ratio * n_visual
        if budget > n_visual:
            raise BudgetError(f"adaptinfer: budget {budget:g} is larger than the {n_visual} visual tokens of this image; "
                              f"use budget <= {n_visual} or ratio=")
        if family in LLAVA_FAMILIES:
            shape, paper = am.llava_shape(budget / max(1, n_visual))
            published = (self.budget_convention == "equal_token" and n_visual == am.LLAVA_TOKENS
                         and n_layers == am.LLAVA_DEPTH and budget == paper
                         and tuple(layers) == tuple(l + 1 for l in am.LLAVA_LAYERS))
            if published:
                return list(am.LLAVA_KEEPS[paper])
        else:
            shape = am.cumulative(am.QWEN_RATIOS)
        return am.solve_keeps(shape, budget, n_visual, n_layers, tuple(layers), self.budget_convention)

    # --- the decision ------------------------------------------------------------------------------------------
    def score(self, view: ScoreView) -> torch.Tensor:
        rows = view.text_positions
        if rows.numel() == 0:
            raise ConfigError("adaptinfer scores visual tokens with the text after the image, and this prompt has "
                              "none; put the question after the image")
        return am.text_prior_scores(view.text_rows_full_attention(), rows, view.visual_positions, self.lb)

    def select(self, view: ScoreView, keep_per_image: list[int]) -> torch.Tensor:
        if not self.recycle or view.layer == 0:
            return super().select(view, keep_per_image)
        from .adaptinfer_recycle import recycle_select
        return recycle_select(self, view, keep_per_image)
