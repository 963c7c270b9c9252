"""vLLM's LLaVA with an mmeff pre-LLM pruner: fewer image placeholders, and the kept embeddings to fill them.

Served as the architecture ``MmeffLlavaForConditionalGeneration`` (choose it with
``hf_overrides={"architectures": [...], "mmeff_prune": "<spec>"}``). Without ``mmeff_prune`` it is vLLM's
LLaVA unchanged, plus one weight-name mapping for checkpoints saved by recent transformers
(``vision_tower.embeddings.*`` instead of ``vision_tower.vision_model.embeddings.*``).
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder, LlavaForConditionalGeneration,
                                              LlavaMultiModalProcessor, LlavaProcessingInfo)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...core.errors import ConfigError
from ...pruners.base import PrunerConfig
from .selection import prune_image
from .spec import SPEC_KEY, kept_per_image, parse_serving_spec

ARCHITECTURE = "MmeffLlavaForConditionalGeneration"


@functools.lru_cache(maxsize=16)
def _parsed(spec: str | None) -> PrunerConfig | None:
    return parse_serving_spec(spec, "llava")


def llava_pruner(hf_config: Any) -> PrunerConfig | None:
    """The pruner the served model's config asks for (None = dense); raises ConfigError for a bad spec."""
    if getattr(getattr(hf_config, "vision_config", None), "model_type", None) == "pixtral":
        raise ConfigError(f"{ARCHITECTURE} serves CLIP/SigLIP LLaVA models; Pixtral-HF is not supported")
    return _parsed(getattr(hf_config, SPEC_KEY, None))


class MmeffLlavaProcessingInfo(LlavaProcessingInfo):
    """Reserves the *kept* number of placeholders per image, so the prompt, KV cache and scheduler see it."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        dense = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        cfg = self.get_hf_config()
        return kept_per_image(llava_pruner(cfg), dense, cfg.text_config.num_hidden_layers)


@MULTIMODAL_REGISTRY.register_processor(
    LlavaMultiModalProcessor, info=MmeffLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder)
class MmeffLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA whose image encoder returns only the tokens the pruner keeps (contiguous positions in the LLM)."""

    hf_to_vllm_mapper = LlavaForConditionalGeneration.hf_to_vllm_mapper | WeightsMapper(orig_to_new_prefix={
        f"vision_tower.{part}.": f"vision_tower.vision_model.{part}."
        for part in ("embeddings", "encoder", "pre_layrnorm", "post_layernorm")
    })

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        pruner = llava_pruner(vllm_config.model_config.hf_config)  # refuse a bad spec before building anything
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.mmeff_pruner = pruner

    def _process_image_input(self, image_input: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        embeds = super()._process_image_input(image_input)
        if self.mmeff_pruner is None or image_input["type"] != "pixel_values":
            return embeds  # dense, or precomputed embeddings (their placeholder count is their length)
        pixels = image_input["pixel_values"]
        n_layers = self.config.text_config.num_hidden_layers
        return tuple(
            prune_image(self.mmeff_pruner, feats, pixels[i], kept_per_image(self.mmeff_pruner, feats.shape[0], n_layers))
            for i, feats in enumerate(embeds)
        )
