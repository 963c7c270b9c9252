"""LLaVA-1.5 and LLaVA-NeXT (anyres crops + newline tokens) host adapters."""
from __future__ import annotations

from typing import Any

import torch

from ..core.registry import register_host
from .vlm_base import VLMAdapter


@register_host
class LlavaAdapter(VLMAdapter):
    """``LlavaForConditionalGeneration``: one contiguous run of image tokens per image."""

    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)

    def encode_images(self, kwargs: dict[str, Any]) -> Any:
        return self.inner.get_image_features(
            pixel_values=kwargs["pixel_values"],
            vision_feature_layer=kwargs.get("vision_feature_layer"),
            vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
            image_sizes=kwargs.get("image_sizes"),
            return_dict=True,
        )

    def full_positions(self, kwargs: dict[str, Any], input_ids: torch.Tensor) -> torch.Tensor:
        # What LlamaModel itself uses when no positions are given on a fresh prompt.
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)

    def expected_visual_tokens(self) -> int | None:
        vc = self.model.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        strategy = getattr(self.model.config, "vision_feature_select_strategy", "default")
        return n if strategy == "default" else n + 1


@register_host
class LlavaNextAdapter(LlavaAdapter):
    """``LlavaNextForConditionalGeneration``: a variable number of tokens per image (base + crops + newlines)."""

    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)

    def expected_visual_tokens(self) -> int | None:
        return None
