"""Qwen2-VL and Qwen2.5-VL host adapters (M-RoPE positions, ``rope_deltas`` correction)."""
from __future__ import annotations

from typing import Any

import torch

from ..core.errors import ConfigError
from ..core.registry import register_host
from . import token_plan as tp
from .vlm_base import VLMAdapter


@register_host
class QwenVLAdapter(VLMAdapter):
    """``Qwen2VLForConditionalGeneration``; images are runs of ``<|image_pad|>`` after the PatchMerger."""

    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)
    uses_mrope = True

    def image_features(self, kwargs: dict[str, Any]) -> list[torch.Tensor]:
        out = self.inner.get_image_features(kwargs["pixel_values"], kwargs.get("image_grid_thw"), return_dict=True)
        return list(out.pooler_output)

    def full_positions(self, kwargs: dict[str, Any], input_ids: torch.Tensor) -> torch.Tensor:
        """3-D M-RoPE positions of the *unpruned* sequence (they need the full grid)."""
        given = kwargs.get("position_ids")
        if given is not None and kwargs.get("image_grid_thw") is None:
            # generate() passes precomputed M-RoPE positions (and has just set rope_deltas itself)
            return given
        tt = kwargs.get("mm_token_type_ids")
        if tt is None:
            raise ConfigError(
                "Qwen-VL needs mm_token_type_ids (returned by the processor) to compute M-RoPE positions; "
                "pass all processor outputs to the model"
            )
        extra = {}
        if kwargs.get("second_per_grid_ts") is not None:
            extra["second_per_grid_ts"] = kwargs["second_per_grid_ts"]
        pos, deltas = self.inner.get_rope_index(
            input_ids, mm_token_type_ids=tt, image_grid_thw=kwargs.get("image_grid_thw"),
            video_grid_thw=kwargs.get("video_grid_thw"), attention_mask=kwargs.get("attention_mask"), **extra)
        self.inner.rope_deltas = deltas
        return pos

    def _after_pre_llm_prefill(self, plan: tp.KeepPlan) -> None:
        # The cache is shorter by (L - L'); positions of later tokens come from the cache length plus
        # rope_deltas, so the deltas grow by the number of removed slots.
        deltas = getattr(self.inner, "rope_deltas", None)
        if deltas is not None:
            self.inner.rope_deltas = deltas + (plan.length - plan.new_length)

    def _decode_positions(self, past_len: int, q: int, plan: tp.KeepPlan) -> torch.Tensor:
        deltas = self.inner.rope_deltas
        bsz = plan.index.shape[0]
        base = (torch.arange(q, device=plan.index.device) + past_len).expand(bsz, -1)
        pos = base + deltas.view(-1, 1).to(base.device)
        return pos.unsqueeze(0).expand(3, -1, -1)


@register_host
class Qwen25VLAdapter(QwenVLAdapter):
    """``Qwen2_5_VLForConditionalGeneration`` (window-attention ViT; same LLM-side layout as Qwen2-VL)."""

    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
