"""Qwen2-VL and Qwen2.5-VL host adapters (M-RoPE positions, ``rope_deltas`` correction)."""
from __future__ import annotations

from typing import Any

import torch

from ..core.registry import register_host
from . import token_plan as tp
from .vlm_base import VLMAdapter


@register_host
class QwenVLAdapter(VLMAdapter):
    """``Qwen2VLForConditionalGeneration``; images are runs of ``<|image_pad|>`` after the PatchMerger."""

    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)
    uses_mrope = True

    def encode_images(self, kwargs: dict[str, Any]) -> Any:
        return self.inner.get_image_features(kwargs["pixel_values"], kwargs.get("image_grid_thw"), return_dict=True)

    def full_positions(self, kwargs: dict[str, Any], input_ids: torch.Tensor) -> torch.Tensor:
        """3-D M-RoPE positions of the *unpruned* sequence (they need the full grid); also sets ``rope_deltas``.

        ``rope_deltas`` stay those of the unpruned sequence: generate() adds them to positions counted on the
        full (logical) sequence when it continues from ``past_key_values``.
        """
        given = kwargs.get("position_ids")
        if given is not None and kwargs.get("image_grid_thw") is None and kwargs.get("video_grid_thw") is None:
            # generate() passes precomputed M-RoPE positions (and has just set rope_deltas itself)
            return given
        extra = {}
        if kwargs.get("second_per_grid_ts") is not None:
            extra["second_per_grid_ts"] = kwargs["second_per_grid_ts"]
        pos, deltas = self.inner.get_rope_index(
            input_ids, mm_token_type_ids=self.token_types(kwargs, input_ids),
            image_grid_thw=kwargs.get("image_grid_thw"), video_grid_thw=kwargs.get("video_grid_thw"),
            attention_mask=kwargs.get("attention_mask"), **extra)
        self.inner.rope_deltas = deltas
        return pos

    def token_types(self, kwargs: dict[str, Any], input_ids: torch.Tensor) -> torch.Tensor:
        """``mm_token_type_ids``; derived from the prompt's placeholders when the caller passed none.

        transformers does not demand them for packed input with explicit positions, so neither do we.
        """
        if kwargs.get("mm_token_type_ids") is not None:
            return super().token_types(kwargs, input_ids)
        n = self.state.prompt_len
        prompt = input_ids[:, :n]
        types = torch.zeros_like(input_ids, dtype=torch.int)
        types[:, :n] = (prompt == self.image_token_id).to(torch.int)
        video = getattr(self.model.config, "video_token_id", None)
        if video is not None:
            types[:, :n] = types[:, :n].masked_fill(prompt == int(video), 2)
        return types

    def _start_from_positions(self, pos: torch.Tensor | None, q: int) -> int | None:
        if pos is not None and pos.dim() == 3 and pos.shape[0] != 4 and self.inner.rope_deltas is not None:
            # M-RoPE positions only: the last token is text, at its index plus the row's rope delta
            return int(pos[0, 0, -1] - self.inner.rope_deltas.flatten()[0]) - (q - 1)
        return super()._start_from_positions(pos, q)

    def _decode_positions(self, logical_past: int, q: int, plan: tp.KeepPlan) -> torch.Tensor:
        deltas = self.inner.rope_deltas
        bsz = plan.index.shape[0]
        base = (torch.arange(q, device=plan.index.device) + logical_past).expand(bsz, -1)
        pos = base + deltas.view(-1, 1).to(base.device)
        return pos.unsqueeze(0).expand(3, -1, -1)


@register_host
class Qwen25VLAdapter(QwenVLAdapter):
    """``Qwen2_5_VLForConditionalGeneration`` (window-attention ViT; same LLM-side layout as Qwen2-VL)."""

    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
