"""Where a prompt's tokens sit in one LLM layer's sequence when a pruner shortened it (for GIFT's rows and columns).

A mitigator applied with a pruner sees, at every layer, only the tokens that survive the pruner's cuts up to that
layer: the first slots of the layer's sequence (and KV cache) hold the kept prompt positions (left fillers first),
the later slots the tokens after the prompt. The host says which (:meth:`VLMAdapter.prompt_slots`); this module
maps prompt positions onto those slots and back. Without a pruner every map is the identity.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import IncompatibleFeatureError

if TYPE_CHECKING:  # pragma: no cover
    from ..hosts.token_plan import KeepPlan


@dataclasses.dataclass
class LayerSlots:
    """The kept prompt positions of one layer (``plan`` in prompt coordinates; None: the whole prompt)."""

    plan: KeepPlan | None

    @classmethod
    def of(cls, adapter: Any, layer: int, prompt: Any) -> LayerSlots:
        slots = getattr(adapter, "prompt_slots", None)
        plan = slots(layer) if slots is not None and adapter.pruner is not None else None
        if plan is not None and plan.length != prompt.input_ids.shape[1]:
            raise IncompatibleFeatureError(
                f"gift: the pruner's decision covers {plan.length} prompt tokens but gift's prompt has "
                f"{prompt.input_ids.shape[1]} (assisted-decoding drafts are not supported with a pruner); generate "
                "without an assistant model, or apply gift alone"
            )
        return cls(plan)

    def _real(self, b: int) -> tuple[torch.Tensor, int]:
        """Kept prompt positions of sample ``b`` (sorted) and the number of filler slots before them."""
        n_fill = int(self.plan.filler[b].sum()) if self.plan.has_fillers else 0
        return self.plan.index[b, n_fill:], n_fill

    def visual(self, b: int, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt positions, slots) of sample ``b``'s visual tokens that reach this layer."""
        if self.plan is None:
            return visual, visual
        real, n_fill = self._real(b)
        kept = torch.isin(real, visual.to(real.device))
        return real[kept], torch.nonzero(kept).flatten() + n_fill

    def rows(self, b: int, positions: torch.Tensor) -> torch.Tensor:
        """Slots of prompt ``positions`` of sample ``b`` that no cut may drop (text tokens)."""
        if self.plan is None:
            return positions
        real, n_fill = self._real(b)
        at = torch.searchsorted(real, positions.to(real.device)).clamp_max(real.numel() - 1)
        if not bool((real[at] == positions).all()):
            raise IncompatibleFeatureError("gift: the pruner dropped question tokens; gift composes only with pruners "
                                           "that drop visual tokens")
        return at + n_fill

    def valid(self, b: int, attn2d: torch.Tensor | None, length: int) -> torch.Tensor | None:
        """[length] bool: slots of sample ``b`` that are real tokens (not padding, not fillers); None: all."""
        if self.plan is None:
            return attn2d[b, :length].bool() if attn2d is not None else None
        ok = ~self.plan.filler[b]
        if attn2d is not None:
            ok = ok & attn2d[b].bool()[self.plan.index[b]]
        if ok.numel() < length:  # tokens after the prompt (drafts) are real
            ok = torch.cat([ok, ok.new_ones(length - ok.numel())])
        return ok[:length]
