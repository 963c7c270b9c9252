"""The contract between the DiT adapter and DiT methods (no model knowledge, no method knowledge).

A DiT method is a frozen config whose ``kind`` picks a handler of :mod:`mmeff.hosts.dit`:

- ``kind = "dit_attention"``: the method replaces the attention op of the sites it wants. It builds an
  :class:`AttentionRuntime` (``config.make_runtime(info)``, or a stateless ``config.attention(ctx, q, k, v,
  attn_mask, scale)``) that is called as ``fn(ctx, q, k, v, attn_mask, scale) -> out`` with q/k/v and the
  output in ``[B, H, S, D]``; ``ctx.attend(...)`` runs the rest of the chain (other methods, then the model's
  own attention backend), so methods compose.
- ``kind = "dit_guidance"``: the method adds a perturbed branch to each denoising step. It builds a
  :class:`GuidanceRuntime` saying which sites and rows to perturb, how (``perturb``), and the guidance weight
  per step (``scale_at``); the adapter owns the batching and the guidance arithmetic.

Methods import these types only; they never see a model class.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", "float | None"], torch.Tensor]

ROLES = ("joint", "self", "cross")


@dataclasses.dataclass(frozen=True)
class AttnSite:
    """One attention module of a DiT.

    ``layer`` is the global block index (FLUX/HunyuanVideo: double blocks first, then single blocks);
    ``role`` is "joint" (text + image in one sequence), "self" (image/video tokens only) or "cross";
    ``primary`` marks the one self/joint attention per block that head-level methods address as layer ``layer``.
    """

    name: str
    layer: int
    heads: int
    role: str
    primary: bool
    text_position: str | None  # "first" | "last" for joint sites, else None

    @property
    def is_cross(self) -> bool:
        return self.role == "cross"


@dataclasses.dataclass(frozen=True)
class DiTInfo:
    """What a method may know about the model it is applied to."""

    family: str
    model_class: str
    sites: tuple[AttnSite, ...]
    n_layers: int
    has_pipeline: bool

    def primary_sites(self) -> list[AttnSite]:
        return [s for s in self.sites if s.primary]

    def heads_per_layer(self) -> dict[int, int]:
        return {s.layer: s.heads for s in self.primary_sites()}


@dataclasses.dataclass
class AttnContext:
    """Where one attention call happens: site, denoising step, token layout, branch rows.

    ``text`` / ``image`` are ``[start, end)`` spans of the joint sequence (``text`` is None for image-only
    sequences); ``grid`` is the latent token grid (T, H, W) after patchify; ``step`` counts denoising steps
    of the current generation from 0 and ``num_steps`` is their number when a pipeline is known (else None);
    ``perturbed`` is the slice of batch rows that belong to a guidance method's perturbed branch (None when
    this call has none); ``call`` numbers the attention ops inside one module call (0 is the main one).
    """

    site: AttnSite
    step: int
    num_steps: int | None
    grid: tuple[int, int, int]
    n_image: int
    text: tuple[int, int] | None
    image: tuple[int, int]
    perturbed: slice | None
    call: int
    attend: AttendFn
    dropout_p: float = 0.0
    is_causal: bool = False

    @property
    def layer(self) -> int:
        return self.site.layer

    @property
    def module_name(self) -> str:
        return self.site.name

    @property
    def step_fraction(self) -> float | None:
        return None if not self.num_steps else self.step / self.num_steps


class AttentionRuntime:
    """Per-application state of a ``dit_attention`` method. Override ``__call__``; ``wants`` picks sites."""

    def wants(self, site: AttnSite) -> bool:
        return not site.is_cross

    def __call__(self, ctx: AttnContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 attn_mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
        return ctx.attend(q, k, v, attn_mask, scale)

    def report(self) -> dict[str, Any]:
        return {}


class FunctionRuntime(AttentionRuntime):
    """Wraps a plain ``fn(ctx, q, k, v, attn_mask, scale)`` (stateless methods)."""

    def __init__(self, fn: Callable[..., torch.Tensor], wants: Callable[[AttnSite], bool] | None = None) -> None:
        self.fn = fn
        self._wants = wants

    def wants(self, site: AttnSite) -> bool:
        return self._wants(site) if self._wants is not None else not site.is_cross

    def __call__(self, ctx, q, k, v, attn_mask, scale):  # type: ignore[override]
        return self.fn(ctx, q, k, v, attn_mask, scale)


class GuidanceRuntime:
    """Per-application state of a ``dit_guidance`` method (one per application)."""

    adds_rows: bool = True  # whether the perturbed branch is ever run (extra batch rows); False for no-op settings

    def wants(self, site: AttnSite) -> bool:
        raise NotImplementedError  # abstract: each guidance method names its sites

    def scale_at(self, step: int, num_steps: int | None) -> float:
        """Guidance weight w at this step; 0 skips the perturbed branch (the step runs unmodified)."""
        raise NotImplementedError  # abstract

    def perturb(self, ctx: AttnContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_mask: torch.Tensor | None, scale: float | None, out: torch.Tensor) -> torch.Tensor:
        """The attention output of the perturbed rows, given their normal output ``out`` ([b, H, S, D])."""
        raise NotImplementedError  # abstract

    def report(self) -> dict[str, Any]:
        return {}
