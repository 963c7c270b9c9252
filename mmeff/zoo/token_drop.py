"""Method-agnostic token-drop augmentation for fine-tuning the zoo VLMs (issue 17).

A visual-token pruner removes image tokens either before the LLM (layer 0) or at some layer K
inside it. mmeff cuts them with the original RoPE positions kept, and a cut at layer K is exactly
the stock model with the dropped key columns blocked in every layer >= K
(``tests/hosts/test_in_llm_twin.py``). This module trains on that mechanism directly: per sample it
draws a *uniformly random* subset of the image tokens, a random budget and a random layer K, and
blocks those columns for all queries from layer K on (K = 0: before the LLM). Nothing here reads a
pruner's score, so the model learns to cope with missing tokens, not with one method's choices.

Per-sample draws (``TokenDropConfig``): with probability ``dense`` nothing is dropped (keeps the
dense skill); otherwise the kept fraction is log-uniform in [``min_keep``, 1] and K is 0 with
probability ``pre_llm`` or uniform in [1, ``max_layer``].
"""
from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

import torch

from .lm_position_aux import decoder_layers


@dataclasses.dataclass(frozen=True)
class TokenDropConfig:
    """How token drops are drawn per training sample (see the module docstring)."""

    dense: float = 0.25
    pre_llm: float = 0.5
    min_keep: float = 0.04
    max_layer: int = 4

    def __post_init__(self) -> None:
        if not (0.0 <= self.dense <= 1.0 and 0.0 <= self.pre_llm <= 1.0):
            raise ValueError(f"dense and pre_llm are probabilities, got {self.dense}, {self.pre_llm}")
        if not 0.0 < self.min_keep <= 1.0:
            raise ValueError(f"min_keep must be in (0, 1], got {self.min_keep}")
        if self.max_layer < 1:
            raise ValueError(f"max_layer must be >= 1, got {self.max_layer}")


@dataclasses.dataclass
class DropPlan:
    """Per sample: which sequence positions are dropped ([B, L] bool) and from which LLM layer on."""

    dropped: torch.Tensor
    layer: list[int]

    def blocked_at(self, index: int) -> torch.Tensor:
        """[B, L] bool: key columns no query may attend to in decoder layer ``index``."""
        active = torch.tensor([k <= index for k in self.layer], dtype=torch.bool, device=self.dropped.device)
        return self.dropped & active[:, None]


def draw_plan(input_ids: torch.Tensor, image_token_id: int, n_layers: int, cfg: TokenDropConfig,
              rng: random.Random) -> DropPlan:
    """A random drop plan for one batch: uniform subsets of each sample's image tokens (no scores)."""
    b, n = input_ids.shape
    dropped = torch.zeros(b, n, dtype=torch.bool)
    layers = []
    max_layer = min(cfg.max_layer, n_layers - 1)
    for i in range(b):
        vis = (input_ids[i] == image_token_id).nonzero().squeeze(-1).cpu()
        if rng.random() < cfg.dense or vis.numel() == 0:
            layers.append(n_layers)  # never active
            continue
        frac = math.exp(rng.uniform(math.log(cfg.min_keep), 0.0))
        keep = max(1, min(vis.numel(), round(frac * vis.numel())))
        order = rng.sample(range(vis.numel()), vis.numel())
        dropped[i, vis[order[keep:]]] = True
        layers.append(0 if rng.random() < cfg.pre_llm else rng.randint(1, max_layer))
    return DropPlan(dropped.to(input_ids.device), layers)


class TokenDrop:
    """Installs attention pre-hooks that block the planned columns; inactive until :meth:`arm`."""

    def __init__(self, model: Any) -> None:
        self.layers = decoder_layers(model)
        self.plan: DropPlan | None = None
        self._handles = [layer.self_attn.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                         for i, layer in enumerate(self.layers)]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def arm(self, plan: DropPlan) -> None:
        self.plan = plan

    def disarm(self) -> None:
        self.plan = None

    def _hook(self, index: int):
        def block(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
            if self.plan is None:
                return None
            cols = self.plan.blocked_at(index)
            if not bool(cols.any()):
                return None
            mask = kwargs.get("attention_mask")
            if mask is None or mask.ndim != 4:
                raise RuntimeError("token drop needs the 4-D attention mask of isolated turns (mmeff.zoo.isolated_turns)")
            full = cols[:, None, None, :].expand_as(mask)
            kwargs["attention_mask"] = (mask.masked_fill(full, False) if mask.dtype == torch.bool
                                        else mask.masked_fill(full, torch.finfo(mask.dtype).min))
            return args, kwargs
        return block

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.plan = None
