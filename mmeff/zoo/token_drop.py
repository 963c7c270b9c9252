"""Method-agnostic token-drop augmentation for fine-tuning the zoo VLMs (issue 17).

A visual-token pruner removes image tokens either before the LLM (layer 0) or at some layer K
inside it, sometimes in a chain of cuts. mmeff cuts them with the original RoPE positions kept, and
a cut at layer K is exactly the stock model with the dropped key columns blocked in every layer >= K
(``tests/hosts/test_in_llm_twin.py``). This module trains on that mechanism directly: per sample it
draws a kept set, a random budget and a random layer K, and blocks the dropped columns for all
queries from layer K on (K = 0: before the LLM); optionally a second, later cut thins the kept set.

Why several *patterns*: a uniformly random subset is exactly what the ``random`` pruner feeds the
LLM, so training on uniform drops alone favours that one method (measured in
``docs/pruning-testbed.md``). The mix is drawn per sample:

- ``uniform``: a uniformly random subset (scattered losses);
- ``blocks``: the union of random axis-aligned rectangles of the token grid (spatially clustered
  keeps, as attention-sink and saliency maps produce);
- ``objects``: tokens on the scene's objects first (from the ground-truth scene labels), then random
  background tokens up to the budget, or a random subset of the object tokens when the budget is
  smaller (what a pruner that finds the objects keeps).

Nothing here reads a pruner's score: the model learns to answer with tokens missing in the ways
pruners remove them, not one method's choices.
"""
from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

import torch

from .lm_position_aux import decoder_layers

PATTERNS: tuple[str, ...] = ("uniform", "blocks", "objects")


@dataclasses.dataclass(frozen=True)
class TokenDropConfig:
    """How token drops are drawn per training sample (see the module docstring).

    ``patterns`` are relative weights of (uniform, blocks, objects); ``chain`` is the probability that a
    drop at K is followed by a second cut at a later layer that keeps a random share of the survivors.
    """

    dense: float = 0.25
    pre_llm: float = 0.5
    min_keep: float = 0.04
    max_layer: int = 4
    patterns: tuple[float, float, float] = (0.3, 0.3, 0.4)
    chain: float = 0.25

    def __post_init__(self) -> None:
        for name in ("dense", "pre_llm", "chain"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability, got {getattr(self, name)}")
        if not 0.0 < self.min_keep <= 1.0:
            raise ValueError(f"min_keep must be in (0, 1], got {self.min_keep}")
        if self.max_layer < 1:
            raise ValueError(f"max_layer must be >= 1, got {self.max_layer}")
        if len(self.patterns) != len(PATTERNS) or min(self.patterns) < 0 or sum(self.patterns) <= 0:
            raise ValueError(f"patterns are {len(PATTERNS)} non-negative weights for {PATTERNS}, not all 0; "
                             f"got {self.patterns}")


@dataclasses.dataclass
class DropPlan:
    """Per sample and position: the first decoder layer from which the token is blocked ([B, L] long).

    ``n_layers`` (or more) means never blocked; 0 means cut before the LLM."""

    from_layer: torch.Tensor

    @classmethod
    def single(cls, dropped: torch.Tensor, layer: list[int]) -> "DropPlan":
        """One cut per sample: the ``dropped`` ([B, L] bool) positions go from ``layer[b]`` on."""
        big = torch.iinfo(torch.long).max
        at = torch.tensor(layer, dtype=torch.long, device=dropped.device)[:, None].expand_as(dropped)
        return cls(torch.where(dropped, at, torch.full_like(at, big)))

    @property
    def dropped(self) -> torch.Tensor:
        """[B, L] bool: positions blocked at some layer."""
        return self.from_layer < torch.iinfo(torch.long).max

    def blocked_at(self, index: int) -> torch.Tensor:
        """[B, L] bool: key columns no query may attend to in decoder layer ``index``."""
        return self.from_layer <= index


def _grid_side(n: int) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"block drops need a square token grid, got {n} image tokens")
    return side


def _keep_uniform(n: int, keep: int, rng: random.Random, **_: Any) -> list[int]:
    return rng.sample(range(n), keep)


def _keep_blocks(n: int, keep: int, rng: random.Random, **_: Any) -> list[int]:
    """Tokens of random rectangles (side 1 .. grid/2), in the order drawn, until ``keep`` are chosen."""
    side = _grid_side(n)
    chosen: dict[int, None] = {}
    while len(chosen) < keep:
        h, w = rng.randint(1, max(1, side // 2)), rng.randint(1, max(1, side // 2))
        top, left = rng.randint(0, side - h), rng.randint(0, side - w)
        for r in range(top, top + h):
            for c in range(left, left + w):
                chosen.setdefault(r * side + c)
    return list(chosen)[:keep]


def _keep_objects(n: int, keep: int, rng: random.Random, on_object: torch.Tensor | None = None,
                  **_: Any) -> list[int]:
    """Object tokens first (random subset if they exceed ``keep``), then random background tokens."""
    if on_object is None:
        raise ValueError("the 'objects' drop pattern needs per-token object labels (objects=...)")
    obj = on_object.nonzero().squeeze(-1).tolist()
    rest = (~on_object).nonzero().squeeze(-1).tolist()
    if keep <= len(obj):
        return rng.sample(obj, keep)
    return obj + rng.sample(rest, keep - len(obj))


_KEEPERS = {"uniform": _keep_uniform, "blocks": _keep_blocks, "objects": _keep_objects}


def draw_plan(input_ids: torch.Tensor, image_token_id: int, n_layers: int, cfg: TokenDropConfig,
              rng: random.Random, objects: torch.Tensor | None = None) -> DropPlan:
    """A random drop plan for one batch (no pruner scores).

    ``objects``: optional [B, N] bool, True where image token k (row-major) lies on an object; needed only
    when the ``objects`` pattern has weight."""
    b, n = input_ids.shape
    never = torch.iinfo(torch.long).max
    from_layer = torch.full((b, n), never, dtype=torch.long)
    max_layer = min(cfg.max_layer, n_layers - 1)
    for i in range(b):
        vis = (input_ids[i] == image_token_id).nonzero().squeeze(-1).cpu()
        if rng.random() < cfg.dense or vis.numel() == 0:
            continue
        frac = math.exp(rng.uniform(math.log(cfg.min_keep), 0.0))
        keep = max(1, min(vis.numel(), round(frac * vis.numel())))
        pattern = rng.choices(PATTERNS, weights=cfg.patterns)[0]
        on_object = objects[i].cpu().bool() if objects is not None else None
        if on_object is not None and on_object.numel() != vis.numel():
            raise ValueError(f"objects has {on_object.numel()} labels for {vis.numel()} image tokens")
        kept = _KEEPERS[pattern](vis.numel(), keep, rng, on_object=on_object)
        layer = 0 if rng.random() < cfg.pre_llm else rng.randint(1, max_layer)
        dropped = torch.ones(vis.numel(), dtype=torch.bool)
        dropped[kept] = False
        from_layer[i, vis[dropped]] = layer
        if layer + 1 < n_layers and len(kept) > 1 and rng.random() < cfg.chain:
            later = rng.randint(layer + 1, n_layers - 1)
            survivors = rng.sample(kept, len(kept))
            share = rng.uniform(0.25, 0.9)
            thinned = survivors[max(1, round(share * len(kept))):]
            from_layer[i, vis[thinned]] = later
    return DropPlan(from_layer.to(input_ids.device))


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
