"""The vision stage of a VLM host: a ViT probe around every image-feature pass, laid out per image.

Created by the host for pruners that need ``vit_importance`` (VFlowOpt). transformers' ``generate()`` encodes
the images *before* the first forward (``mm_encoder_outputs``), so the stage wraps the multimodal model's
``get_image_features`` on this instance only (undone by ``remove()``): each call arms the probe, runs the
original method, and attaches the per-image maps to the returned output (``vflowopt_maps``), where the
pre-LLM decision finds them, whether the features came from ``generate()`` or from the forward itself.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from ..core.hooks import HookSet
from ..pruners.vflowopt import VFlowOpt, VFlowOptParams
from .vit_layout import ImageMap, llava_maps, qwen_maps
from .vit_probe import make_probe


class VisionStage:
    """Importance maps of a forward's images, in the order of each image's placeholder tokens."""

    def __init__(self, adapter: Any, pruner: VFlowOpt) -> None:
        self.adapter = adapter
        self.pruner = pruner  # already bound to the model's calibration (VFlowOpt.bound_to)
        self.alpha_v = pruner.hyper("alpha_v")
        self.probe = make_probe(adapter.model, adapter.family, pruner.vit_layer, pruner.hyper("vit_t"))
        self._layout = llava_maps if adapter.family in ("llava", "llava_next") else qwen_maps
        self._params: dict[int, VFlowOptParams] = {}

    def install(self, hooks: HookSet) -> None:
        self.probe.install(hooks)
        inner = self.adapter.inner
        hooks.set_attr(inner, "get_image_features", self._wrap(inner.get_image_features))

    def _wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(original)

        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            named = signature.bind_partial(*args, **kwargs).arguments
            named.update(named.pop("kwargs", {}))
            self.probe.arm()
            try:
                out = original(*args, **kwargs)
                results = list(self.probe.results)
            finally:
                self.probe.disarm()
            if results and not isinstance(out, tuple):
                relevance = torch.cat(results)
                with self.adapter.timer.section("vit_importance", relevance.device):
                    out.vflowopt_maps = self._maps(named, relevance)
            return out

        get_image_features.__wrapped__ = original  # type: ignore[attr-defined]
        return get_image_features

    def _maps(self, kwargs: dict[str, Any], relevance: torch.Tensor) -> list[ImageMap]:
        p = self.pruner
        return self._layout(self.adapter.model, self.adapter.family, kwargs, relevance, self.alpha_v,
                            p.pixel_mean, p.pixel_std)

    def params(self, n_visual: int) -> VFlowOptParams:
        """Resolved hyperparameters for an image of ``n_visual`` tokens (cached per size)."""
        if n_visual not in self._params:
            self._params[n_visual] = self.pruner.params(n_visual, self.adapter.n_layers)
        return self._params[n_visual]

