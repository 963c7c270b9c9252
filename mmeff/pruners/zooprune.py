"""ZOO-Prune (arXiv 2509.24837): projector sensitivity by zeroth-order estimates, then diverse selection.

Before the LLM, every visual token is scored by how strongly the vision-language projector's output moves
when its input moves (``S_i = mean_j ||J(x_i) u_j||`` over m shared random directions, :mod:`.zoo_sensitivity`),
and tokens are picked greedily to be both sensitive and diverse in the projected space (:mod:`.sads`).
LLaVA-1.5/NeXT perturb the MLP projector's input; Qwen2-VL/2.5-VL the PatchMerger's input per merged
token (its 2x2 patches). The host supplies both through ``ScoreView.projector_probe``.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..core.config import require
from ..core.registry import register_method
from .base import PrunerConfig, ScoreView, Stage
from .sads import sads_select
from .zoo_sensitivity import draw_directions, projector_sensitivity


@register_method
@dataclasses.dataclass(frozen=True)
class ZOOPrune(PrunerConfig):
    """Options beyond the common pruner ones (defaults: the released code):

    directions: m, the number of random directions (64).
    step: h, the finite-difference step (0.01; unused by the JVP estimator).
    direction_kind: "unit" (the code normalises them) or "gaussian" (the paper's wording).
    estimator: "jvp" (exact Jacobian-vector product, the fast path) or "fd" (central differences, official).
    chunk: (token, direction) pairs per projector call, bounding memory.
    seed: the directions are drawn from this seed and the prompt (reproducible; batch-independent).
    """

    name: ClassVar[str] = "zooprune"
    stage: ClassVar[Stage] = "pre_llm"
    needs: ClassVar[frozenset[str]] = frozenset({"features", "projector"})

    directions: int = 64
    step: float = 0.01
    direction_kind: str = "unit"
    estimator: str = "jvp"
    chunk: int = 4096
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        require(self.directions >= 1, f"zooprune: directions (m) must be >= 1, got {self.directions}")
        require(self.step > 0, f"zooprune: step (h) must be > 0, got {self.step}")
        require(self.direction_kind in ("unit", "gaussian"),
                f"zooprune: direction_kind must be 'unit' or 'gaussian', got {self.direction_kind!r}")
        require(self.estimator in ("jvp", "fd"), f"zooprune: estimator must be 'jvp' or 'fd', got {self.estimator!r}")
        require(self.chunk >= 1, f"zooprune: chunk must be >= 1, got {self.chunk}")

    def sensitivity(self, view: ScoreView) -> torch.Tensor:
        """``[n_visual]`` projector sensitivity (0 for tokens without projector input)."""
        rows, valid, fn = view.projector_probe()
        u = draw_directions(view.generator(), self.directions, rows.shape[-1], self.direction_kind)
        out = torch.zeros(rows.shape[0], dtype=torch.float32, device=rows.device)
        with torch.inference_mode(False), torch.no_grad():
            x = rows[valid].clone()  # a normal tensor: forward-mode AD refuses inference tensors
            s = projector_sensitivity(fn, x, u, step=self.step, estimator=self.estimator, chunk=self.chunk)
        out[valid] = s.float().to(out.device)
        return out

    def score(self, view: ScoreView) -> torch.Tensor:
        return self.sensitivity(view)

    def select(self, view: ScoreView, keep_per_image: list[int]) -> torch.Tensor:
        """Per image: SADS on the min-max sensitivity and the projected features; sorted sample-local indices."""
        if all(k >= end - start for (start, end), k in zip(view.spans, keep_per_image)):
            return torch.arange(view.n_visual)  # keep everything: no projector passes needed
        sens = self.sensitivity(view)
        feats = view.features()
        kept = []
        for (start, end), k in zip(view.spans, keep_per_image):
            if k >= end - start:
                kept.append(torch.arange(start, end, device=sens.device))
            elif k > 0:
                kept.append(sads_select(sens[start:end], feats[start:end].to(sens.device), k) + start)
        if not kept:
            return torch.zeros(0, dtype=torch.long, device=sens.device)
        return torch.sort(torch.cat(kept)).values
