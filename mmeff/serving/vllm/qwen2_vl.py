"""vLLM's Qwen2-VL with an mmeff pre-LLM pruner; kept tokens keep their original M-RoPE (t, h, w) positions.

Served as ``MmeffQwen2VLForConditionalGeneration``. It takes vLLM's EVS route:
- each image reserves only the kept number of placeholders (the processor's prompt update);
- the encoder returns the kept embeddings with 4 extra channels: the token's (t, h, w) grid position,
  and the image's max(t, h, w), where the text after the image resumes;
- ``recompute_mrope_positions`` strips these channels and rebuilds the sequence's positions with vLLM's own
  ``evs.recompute_mrope_positions``.

The model runner only takes that route when its ``is_multimodal_pruning_enabled`` is set. vLLM sets it only
for ``video_pruning_rate > 0``, and its CPU runner never does. So the plugin's worker
(``--worker-cls mmeff.serving.vllm.worker.MmeffCPUWorker``) turns it on for these models. Without that worker,
a pruned request fails with one line that says so.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from vllm.model_executor.models.interfaces import SupportsMultiModalPruning
from vllm.model_executor.models.qwen2_vl import (Qwen2VLDummyInputsBuilder, Qwen2VLForConditionalGeneration,
                                                 Qwen2VLMultiModalProcessor, Qwen2VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.video_prune.evs import recompute_mrope_positions

from ...core.errors import ConfigError
from ...pruners.base import PrunerConfig
from .selection import kept_indices
from .spec import SPEC_KEY, kept_per_image, parse_serving_spec

ARCHITECTURE = "MmeffQwen2VLForConditionalGeneration"
WORKER_HINT = ("start vLLM with --worker-cls mmeff.serving.vllm.worker.MmeffCPUWorker "
               "(LLM(..., worker_cls=...)), which lets the runner rebuild M-RoPE positions of pruned images")


@functools.lru_cache(maxsize=16)
def _parsed(spec: str | None) -> PrunerConfig | None:
    return parse_serving_spec(spec, "qwen2_vl")


def qwen_pruner(hf_config: Any) -> PrunerConfig | None:
    """The pruner the served model's config asks for (None = dense); raises ConfigError for a bad spec."""
    return _parsed(getattr(hf_config, SPEC_KEY, None))


def _n_layers(hf_config: Any) -> int:
    return getattr(hf_config, "text_config", hf_config).num_hidden_layers


class MmeffQwen2VLProcessingInfo(Qwen2VLProcessingInfo):
    """Budgets (profiling, scheduler) count the kept image tokens."""

    def get_num_image_tokens(self, **kwargs: Any) -> int:
        cfg = self.get_hf_config()
        return kept_per_image(qwen_pruner(cfg), super().get_num_image_tokens(**kwargs), _n_layers(cfg))


class MmeffQwen2VLMultiModalProcessor(Qwen2VLMultiModalProcessor):
    """Each image's placeholder run is cut to the kept count (videos are left whole)."""

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Any, out_mm_kwargs: Any) -> Sequence[Any]:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        cfg = self.info.get_hf_config()
        pruner = qwen_pruner(cfg)
        if pruner is None:
            return updates

        def kept_run(item_idx: int, dense_run: Any) -> list[int]:
            run = dense_run(item_idx)
            return run[:kept_per_image(pruner, len(run), _n_layers(cfg))]

        return [dataclasses.replace(u, replacement=functools.partial(kept_run, dense_run=u.replacement))
                if u.modality == "image" else u for u in updates]


@MULTIMODAL_REGISTRY.register_processor(
    MmeffQwen2VLMultiModalProcessor, info=MmeffQwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder)
class MmeffQwen2VLForConditionalGeneration(Qwen2VLForConditionalGeneration, SupportsMultiModalPruning):
    """Qwen2-VL whose image encoder returns the kept tokens, each carrying its original M-RoPE position."""

    supported_video_pruning_methods: ClassVar[tuple[str, ...]] = ()
    mmeff_position_rebuild = False  # set on the instance by mmeff's worker once the runner rebuilds positions

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        pruner = qwen_pruner(vllm_config.model_config.hf_config)  # refuse a bad spec before building anything
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.mmeff_pruner = pruner

    # -------------------------------------------------------------- encoder side
    def _process_image_input(self, image_input: Any) -> tuple[torch.Tensor, ...]:
        embeds = super()._process_image_input(image_input)
        pruner = self.mmeff_pruner
        if pruner is None:
            return embeds
        if image_input["type"] != "pixel_values":
            raise ConfigError(f"{ARCHITECTURE} with mmeff_prune prunes images given as pixels, not image_embeds; "
                              "send images, or serve without mmeff_prune")
        if not self.mmeff_position_rebuild:
            raise ConfigError(f"{ARCHITECTURE} with mmeff_prune needs its positions rebuilt: {WORKER_HINT}")
        grids = image_input["image_grid_thw"].tolist()
        patches = image_input["pixel_values"].split([t * h * w for t, h, w in grids])
        merge = self.visual.spatial_merge_size
        out = []
        for feats, pixels, (t, h, w) in zip(embeds, patches, grids):
            grid = (t, h // merge, w // merge)
            keep = kept_per_image(pruner, feats.shape[0], _n_layers(self.config))
            idx = kept_indices(pruner, feats, pixels, keep)
            pos = torch.from_numpy(np.indices(grid).reshape(3, -1)).to(feats.device)[:, idx]
            resume = torch.full((1, idx.numel()), max(grid), device=feats.device)
            out.append(torch.cat([feats[idx], torch.cat([pos, resume]).T.to(feats.dtype)], dim=1))
        return tuple(out)

    def _process_video_input(self, video_input: Any) -> tuple[torch.Tensor, ...]:
        if self.mmeff_pruner is not None:
            raise ConfigError(f"{ARCHITECTURE} with mmeff_prune serves images only; serve videos without mmeff_prune")
        return super()._process_video_input(video_input)

    def recompute_mrope_positions(self, input_ids: Any, multimodal_embeddings: Sequence[torch.Tensor],
                                  mrope_positions: torch.LongTensor,
                                  num_computed_tokens: int) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        """Strip the 4 position channels and let vLLM's EVS helper rebuild the positions from them."""
        device = multimodal_embeddings[0].device if len(multimodal_embeddings) else mrope_positions.device
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
        positions, delta = recompute_mrope_positions(
            ids, [e[:, -4:].T.long() for e in multimodal_embeddings], mrope_positions, num_computed_tokens,
            self.config.vision_start_token_id, self.config.image_token_id, self.config.video_token_id)
        return [e[:, :-4] for e in multimodal_embeddings], positions, delta

    # -------------------------------------------------------------- prompt-time positions
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        """Positions of the *pruned* prompt before the encoder runs: each image's first kept-count grid
        positions (placeholders of the right length; recompute_mrope_positions fills in the kept ones)."""
        if self.mmeff_pruner is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        pieces, st, next_pos = [], 0, 0
        for offset, t, h, w, _ in self.iter_mm_grid_thw(mm_features):
            text = offset - st
            pieces.append(np.broadcast_to(np.arange(text), (3, text)) + next_pos)
            keep = kept_per_image(self.mmeff_pruner, t * h * w, _n_layers(self.config))
            pieces.append(np.indices((t, h, w)).reshape(3, -1)[:, :keep] + next_pos + text)
            next_pos += text + max(t, h, w)
            st = offset + keep
        tail = len(input_tokens) - st
        pieces.append(np.broadcast_to(np.arange(tail), (3, tail)) + next_pos)
        positions = np.concatenate(pieces, axis=1)
        return torch.from_numpy(positions), int(positions.max() + 1 - len(input_tokens))
