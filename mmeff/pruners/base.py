"""Visual-token pruner contract: budget accounting and the keep-index decision.

A pruner never touches a model. The VLM host adapter asks it, per sample, for one score per
visual token (higher = keep) given a :class:`ScoreView` that computes only what the pruner asks
for, and keeps the top ``keep_count`` tokens of each image, in their original order.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal, Protocol

import torch

from ..core.config import MethodConfig, require
from ..core.errors import BudgetError

Stage = Literal["llm", "pre_llm"]


class ScoreView(Protocol):
    """What a pruner may read for one sample; every tensor is restricted to that sample's visual tokens.

    Only the requested quantities are computed (no L x L attention maps exist anywhere).
    """

    sample: int
    n_visual: int
    spans: list[tuple[int, int]]          # per image: [start, end) in sample-local visual-token indices
    cut: int                              # which cut of the method's plan is being decided (0 = the first)
    layer: int                            # the layer the cut applies to (0 = before the LLM)
    carry: dict[str, torch.Tensor]        # per-token values [n_visual] the host carries through later cuts

    def get(self, name: str) -> torch.Tensor: ...        # a quantity from the score registry (register_vlm_score)

    def last_query_attention(self) -> torch.Tensor: ...  # [H, n_visual] probs of the last real query (layer K-1)
    def query_states(self) -> torch.Tensor: ...          # [n_visual, H, d] post-RoPE queries of layer K-1
    def key_states(self) -> torch.Tensor: ...            # [n_visual, H, d] post-RoPE keys of layer K-1
    def text_rows_attention(self) -> torch.Tensor: ...   # [H, R, n_visual] probs of the R text rows after the image
    def hidden_states(self) -> torch.Tensor: ...         # [n_visual, D] hidden states entering layer K
    def features(self) -> torch.Tensor: ...              # [n_visual, D] projected image features (pre-LLM)
    def generator(self) -> torch.Generator: ...          # seeded RNG for stochastic pruners


@dataclasses.dataclass(frozen=True)
class PrunerConfig(MethodConfig):
    """Common options of every visual-token pruner. Give exactly one of ``budget``, ``ratio`` or ``keep``.

    budget: the *layer-averaged equivalent budget*: visual tokens per image averaged over all LLM layers
            (the papers' 64/128/192 tables). A cut at layer K of an L-layer LLM keeps
            ``(L*budget - K*N) / (L - K)`` of the N visual tokens, because layers before K still see all N.
            Worked example, LLaVA-1.5-7B (L=32, N=576), ``fastv:budget=64,layer=2``: layers 0-1 see 576,
            layers 2-31 see (32*64 - 2*576) / 30 = 29 tokens; the average over 32 layers is 64.
            For pre-LLM pruners (K=0) the budget is simply the tokens entering the LLM.
    ratio:  the same budget as a fraction of each image's visual tokens (use for variable-size images).
    keep:   the visual tokens kept per image *after the cut* (official FastV's / EntropyPrune's "rank"):
            ``fastv:keep=64,layer=2`` keeps 64 of 576 from layer 2 on (equivalent budget (2*576 + 30*64)/32 = 96).
    layer:  the pruning layer K (0-indexed; None = the method's per-model default).
    positions: "original" keeps the kept tokens' RoPE positions (default); "reindex" makes them contiguous.
    """

    kind: ClassVar[str] = "visual_token_pruner"
    stage: ClassVar[Stage] = "llm"
    needs: ClassVar[frozenset[str]] = frozenset()

    budget: int | None = None
    ratio: float | None = None
    layer: int | None = None
    positions: str = "original"
    keep: int | None = None

    def validate(self) -> None:
        given = [f"{k}=" for k in ("budget", "ratio", "keep") if getattr(self, k) is not None]
        require(len(given) <= 1, f"{self.name}: give one of budget=, ratio= or keep=, not {' and '.join(given)}")
        require(bool(given),
                f"{self.name}: give a budget (e.g. budget=64, the layer-averaged visual tokens per image), "
                "a ratio (e.g. ratio=0.25) or keep= (e.g. keep=64 tokens kept after the cut)")
        require(self.keep is None or self.keep >= 0, f"{self.name}: keep must be >= 0, got {self.keep}")
        require(self.budget is None or self.budget >= 0, f"{self.name}: budget must be >= 0, got {self.budget}")
        require(self.ratio is None or 0.0 <= self.ratio <= 1.0, f"{self.name}: ratio must be in [0, 1], got {self.ratio}")
        require(self.layer is None or self.layer >= 0, f"{self.name}: layer must be >= 0, got {self.layer}")
        require(self.positions in ("original", "reindex"),
                f"{self.name}: positions must be 'original' or 'reindex', got {self.positions!r}")
        if self.stage == "pre_llm":
            require(self.layer in (None, 0), f"{self.name} prunes before the LLM; layer must be 0 or unset")

    # --- per-model defaults -------------------------------------------------------------
    def plan_layers(self, family: str, n_layers: int) -> tuple[int, ...]:
        """Where the method cuts, strictly increasing: 0 = before the LLM, K >= 1 = the input of LLM layer K.

        One-cut pruners (FastV, EntropyPrune, random) return ``(resolve_layer(family),)``; progressive ones
        return a chain, e.g. AdaptInfer ``(2, 11, 21)``. Cut ``j`` at K >= 1 is scored with layer K-1 and keeps
        a subset of what cut ``j-1`` kept (docs/vlm-plan.md).
        """
        return (self.resolve_layer(family),)

    def keep_schedule(self, n_visual: int, n_layers: int, layers: tuple[int, ...], family: str = "") -> list[int]:
        """Visual tokens of one image (of ``n_visual`` in the prompt) kept after each cut of ``layers``.

        Non-increasing; the host caps each entry at what the previous cut kept. One cut: :meth:`keep_count`.
        """
        return [self.keep_count(n_visual, n_layers, layers[0])]

    def default_layer(self, family: str) -> int:
        """Pruning layer K when ``layer`` is unset. Override per method."""
        return 0 if self.stage == "pre_llm" else 2

    def resolve_layer(self, family: str) -> int:
        return 0 if self.stage == "pre_llm" else (self.layer if self.layer is not None else self.default_layer(family))

    # --- budget accounting ----------------------------------------------------------------
    def keep_count(self, n_visual: int, n_layers: int, layer: int) -> int:
        """Visual tokens of one image kept after the cut at layer ``layer``.

        ``keep=N``: N. ``budget=B`` (or ``ratio``): the count whose layer-average equals B,
        ``(L*B - K*N) / (L - K)`` (see the class docstring; K=0 gives B).
        """
        if layer >= n_layers:
            raise BudgetError(f"{self.name}: layer {layer} does not exist (the LLM has {n_layers} layers)")
        if self.keep is not None:
            if self.keep > n_visual:
                raise BudgetError(
                    f"{self.name}: keep={self.keep} is more than the {n_visual} visual tokens of this image; "
                    f"use keep <= {n_visual} (keep={n_visual} keeps everything) or ratio=..."
                )
            return int(self.keep)
        budget = self.budget if self.budget is not None else self.ratio * n_visual
        if budget > n_visual:
            raise BudgetError(
                f"{self.name}: budget {self.budget} is larger than the {n_visual} visual tokens of this image; "
                f"use budget <= {n_visual} (budget={n_visual} keeps everything) or ratio=..."
            )
        if budget >= n_visual:
            return n_visual
        keep = (n_layers * budget - layer * n_visual) / (n_layers - layer)
        if keep < 0:
            minimum = layer * n_visual / n_layers
            raise BudgetError(
                f"{self.name}: an average budget of {budget:g} tokens cannot be met when pruning at layer {layer} "
                f"({layer} of {n_layers} layers already see all {n_visual} tokens, i.e. >= {minimum:.1f}); "
                f"use budget >= {int(minimum) + 1}, an earlier layer=, or keep=N to keep N tokens after the cut"
            )
        return int(keep + 1e-9)

    # --- the decision ---------------------------------------------------------------------
    def score(self, view: ScoreView) -> torch.Tensor:
        """One score per visual token of the sample (higher = keep)."""
        raise NotImplementedError  # abstract: every pruner implements it

    def select(self, view: ScoreView, keep_per_image: list[int]) -> torch.Tensor:
        """Sorted sample-local visual indices to keep: the top-k scores inside each image."""
        scores = self.score(view).float()
        kept = []
        for (start, end), k in zip(view.spans, keep_per_image):
            if k >= end - start:
                kept.append(torch.arange(start, end, device=scores.device))
            elif k > 0:
                top = torch.topk(scores[start:end], k, largest=True, sorted=False).indices + start
                kept.append(top)
        if not kept:
            return torch.zeros(0, dtype=torch.long, device=scores.device)
        return torch.sort(torch.cat(kept)).values
