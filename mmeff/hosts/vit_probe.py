"""Vision-stage probes: per-token context relevance (VFlowOpt) read at one ViT attention layer.

A probe installs per-instance hooks on one vision attention module. While it is armed (only during the
feature pass of a new prompt) it captures that layer's query/key projections and computes, per attention
block the layer actually runs (a CLIP crop, a Qwen image or window), the attention the global tokens pay to
every token (:func:`~mmeff.pruners.vflowopt_math.context_relevance`): only the needed rows, from q and k.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch

from ..core.errors import ConfigError, UnsupportedModelError
from ..core.hooks import HookSet
from ..pruners.vflowopt_math import context_relevance


class ViTProbe:
    """Base: arm(), run the vision tower, then ``results`` holds what the layer produced."""

    def __init__(self, attn: torch.nn.Module, t: float) -> None:
        self.attn = attn
        self.t = t
        self.armed = False
        self.results: list[torch.Tensor] = []
        self._captured: dict[str, Any] = {}

    def arm(self) -> None:
        self.armed = True
        self.results = []
        self._captured = {}

    def disarm(self) -> None:
        self.armed = False
        self._captured = {}

    def _keep(self, name: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self.armed:
                self._captured[name] = output.detach()
        return hook

    def install(self, hooks: HookSet) -> None:
        raise NotImplementedError  # abstract: per tower


class ClipProbe(ViTProbe):
    """CLIP-like towers (LLaVA-1.5 / NeXT): one block per crop; the CLS token (index 0) is always global.

    ``results``: one [n_crops, N] tensor per vision forward (CLS column dropped).
    """

    def install(self, hooks: HookSet) -> None:
        hooks.post_hook(self.attn.q_proj, self._keep("q"))
        hooks.post_hook(self.attn.k_proj, self._keep("k"))
        hooks.post_hook(self.attn, self._compute)

    def _compute(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if not self.armed:
            return
        q, k = self._captured.pop("q"), self._captured.pop("k")
        crops, n, _ = q.shape
        heads = module.num_heads
        q = q.view(crops, n, heads, -1).transpose(1, 2)
        k = k.view(crops, n, heads, -1).transpose(1, 2)
        rel = torch.stack([context_relevance(q[c], k[c], module.scale, self.t, forced=(0,)) for c in range(crops)])
        self.results.append(rel[:, 1:])


class QwenProbe(ViTProbe):
    """Qwen2-VL / 2.5-VL towers: blocks are the ``cu_seqlens`` segments the layer runs (images or windows).

    ``results``: one [S] tensor per vision forward, in the layer's token order (2.5-VL: window-permuted).
    """

    def install(self, hooks: HookSet) -> None:
        hooks.pre_hook(self.attn, self._inputs)
        hooks.post_hook(self.attn.qkv, self._keep("qkv"))
        hooks.post_hook(self.attn, self._compute)

    def _inputs(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        if self.armed:
            self._captured["cu_seqlens"] = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
            self._captured["position_embeddings"] = kwargs.get("position_embeddings")
        return None

    def _compute(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if not self.armed:
            return
        qkv = self._captured.pop("qkv")
        seq = qkv.shape[0]
        q, k, _ = qkv.reshape(seq, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        rope = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb_vision", None)
        pe = self._captured.get("position_embeddings")
        if rope is None or pe is None:
            raise UnsupportedModelError(f"cannot rebuild the rotated q/k of {type(module).__name__}")
        q, k = rope(q, k, *pe)
        q, k = q.transpose(0, 1), k.transpose(0, 1)  # [H, S, d]
        bounds = [int(b) for b in self._captured["cu_seqlens"].tolist()]
        parts = [context_relevance(q[:, s:e], k[:, s:e], module.scaling, self.t)
                 for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
        self.results.append(torch.cat(parts))


def clip_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The CLIP encoder layers of a LLaVA tower (``CLIPVisionModel`` or a bare ``CLIPVisionTransformer``)."""
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers


def clip_feature_layer(model: torch.nn.Module) -> int:
    """Index of the CLIP encoder layer whose output LLaVA uses as features (the deepest, for several)."""
    n_layers = len(clip_layers(model))
    feature = model.config.vision_feature_layer
    feature = max((f % (n_layers + 1) for f in feature), default=0) if isinstance(feature, (list, tuple)) \
        else feature % (n_layers + 1)
    if feature == 0:
        raise ConfigError("vflowopt: the vision features are the patch embeddings (vision_feature_layer=0); "
                          "there is no attention layer to read; give vit_layer=")
    return feature - 1


def make_probe(model: torch.nn.Module, family: str, layer: int | None, t: float) -> ViTProbe:
    """The probe for this family's tower at ``layer`` (None: the layer producing the features)."""
    if family in ("llava", "llava_next"):
        layers = clip_layers(model)
        index = clip_feature_layer(model) if layer is None else layer
        cls = ClipProbe
        attn_of = lambda i: layers[i].self_attn
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        layers = model.model.visual.blocks
        index = len(layers) - 1 if layer is None else layer
        cls = QwenProbe
        attn_of = lambda i: layers[i].attn
    else:
        raise UnsupportedModelError(f"vflowopt has no vision probe for {family}")
    if not 0 <= index < len(layers):
        raise ConfigError(f"vflowopt: vit_layer={index} does not exist; the vision tower has {len(layers)} layers "
                          f"(0..{len(layers) - 1})")
    return cls(attn_of(index), t)
