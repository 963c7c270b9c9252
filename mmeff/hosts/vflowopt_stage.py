"""The vision stage of a VLM host: runs the tower with a ViT probe armed and lays the importance out per image.

Created by the host for pruners that need ``vit_importance`` (VFlowOpt). The probe is armed only while the
features of a *new* prompt are computed; a forward that continues a pruned prompt reuses the decision.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..core.hooks import HookSet
from ..pruners.vflowopt import VFlowOpt, VFlowOptParams
from .vit_layout import ImageMap, llava_maps, qwen_maps
from .vit_probe import make_probe


class VisionStage:
    """Importance maps of a forward's images, in the order of each image's placeholder tokens."""

    def __init__(self, adapter: Any, pruner: VFlowOpt, with_cuts: bool = False) -> None:
        self.adapter = adapter
        self.pruner = pruner
        self.with_cuts = with_cuts
        source = getattr(adapter.model.config, "_name_or_path", None)
        self.model_dir = source if source and Path(source).is_dir() else None
        self.alpha_v = pruner.hyper("alpha_v", self.model_dir)
        self.probe = make_probe(adapter.model, adapter.family, pruner.vit_layer, pruner.hyper("vit_t", self.model_dir))
        self._layout = llava_maps if adapter.family in ("llava", "llava_next") else qwen_maps
        self._params: dict[int, VFlowOptParams] = {}

    def install(self, hooks: HookSet) -> None:
        self.probe.install(hooks)

    def params(self, n_visual: int) -> VFlowOptParams:
        """Resolved hyperparameters for an image of ``n_visual`` tokens (cached per size)."""
        if n_visual not in self._params:
            self._params[n_visual] = self.pruner.params(n_visual, self.adapter.n_layers, self.model_dir, self.with_cuts)
        return self._params[n_visual]

    def features(self, kwargs: dict[str, Any]) -> tuple[list[torch.Tensor], list[ImageMap]]:
        """The projected features of every image and its importance map (one tower pass)."""
        self.probe.arm()
        try:
            feats = self.adapter.image_features(kwargs)
            results = list(self.probe.results)
        finally:
            self.probe.disarm()
        relevance = torch.cat(results)
        p = self.pruner
        maps = self._layout(self.adapter.model, self.adapter.family, kwargs, relevance, self.alpha_v,
                            p.pixel_mean, p.pixel_std)
        return feats, maps
