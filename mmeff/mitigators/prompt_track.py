"""Which prompt a forward belongs to, so a mitigator decides on the prompt and reuses the decision after.

One outer-model pre-hook classifies every forward:

- ``new``: an empty cache and ids that do not extend the last prompt (decide now, on this prompt);
- ``continue``: an empty cache and ids that extend the last prompt row by row (``use_cache=False`` steps,
  a conversation re-run without its cache): reuse the prompt's decision;
- ``decode``: a forward on a filled cache: reuse the decision.

The same rule as the pruners' (:mod:`mmeff.hosts.prompt_match`), kept separate so a mitigator works with
or without a pruner.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..core.errors import IncompatibleFeatureError, MissingImageError
from ..hosts import prompt_match as pm

NEW, CONTINUE, DECODE, OFF = "new", "continue", "decode", "off"


@dataclasses.dataclass
class PromptState:
    """The prompt whose decision is in force, and what the current forward is."""

    phase: str = OFF
    input_ids: torch.Tensor | None = None
    attn2d: torch.Tensor | None = None
    images: list[tuple[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0]) if self.input_ids is not None else 0

    def last_index(self) -> torch.Tensor | None:
        """Per-row index of the prompt's last real token, or None when it is the last column (left padding)."""
        m = self.attn2d
        if m is None or bool(m[:, -1].bool().all()):
            return None
        return (m.long() * torch.arange(m.shape[1], device=m.device)).argmax(-1)


def classify(state: PromptState, kwargs: dict[str, Any], image_token_id: int, name: str) -> PromptState:
    """Update ``state`` for a forward with these kwargs (see the module docstring)."""
    ids = kwargs.get("input_ids")
    past = kwargs.get("past_key_values")
    past_len = int(past.get_seq_length()) if past is not None else 0
    if past_len > 0:
        rows = (ids if ids is not None else kwargs["inputs_embeds"]).shape[0]
        if state.input_ids is None or rows != state.rows:
            raise IncompatibleFeatureError(
                f"{name}: this forward continues a cache that was not filled by the last prompt of this batch; "
                "run the prompt again without past_key_values"
            )
        state.phase = DECODE
        return state
    if ids is None:
        raise MissingImageError(f"{name} needs input_ids to find the image and the question; pass input_ids, not "
                                "inputs_embeds alone")
    mask = kwargs.get("attention_mask")
    mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    images = pm.image_inputs(kwargs)
    if state.input_ids is not None and pm.continues_prompt(state.input_ids, state.attn2d, state.images, ids,
                                                           mask2d, images):
        state.phase = CONTINUE
        return state
    if not bool((ids == image_token_id).any(-1).all()):
        raise MissingImageError(
            f"{name}: every sample needs an image (no image tokens found in at least one row); pass pixel_values "
            "with an image placeholder in each prompt, or call handle.remove() before running text-only prompts"
        )
    return PromptState(phase=NEW, input_ids=ids, attn2d=mask2d, images=images)
