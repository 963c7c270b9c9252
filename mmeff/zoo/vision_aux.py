"""Dense auxiliary supervision of a zoo VLM's image features during training.

A small read-out head reads the features the LM receives (LLaVA: the projector output, one
per 14 px patch; Qwen2-VL: the merger output, one per 28 px cell) and predicts, per
token, the shape/colour/size/word under it and its object's centre
(:mod:`mmeff.zoo.world.labels`). The head is training-only: it is never saved with the
model, which stays a stock ``transformers`` class.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .world.labels import PatchLabels
from .world.scene import COLOURS, SHAPES, SIZES, WORDS

CATEGORIES: tuple[str, ...] = ("shape", "colour", "size", "word")


class VisionAuxHead(nn.Module):
    """Per-token read-out of :class:`PatchLabels` targets from image features.

    The class prototypes of shape/colour/size/word are the LM's own input embeddings of
    those words (as they appear inside a question, e.g. " circle"), plus one learned
    "background" prototype per category; logits are scaled cosine similarities. So the
    tower learns to put a red-circle patch near the embeddings of " red" and " circle",
    and the LM can answer by matching question words to image tokens (a look-up by
    content) instead of having to discover the alignment from the answer loss alone. The object centre is a separate linear regression.
    """

    def __init__(self, hidden: int, class_token_ids: dict[str, list[list[int]]]):
        super().__init__()
        self.class_token_ids = class_token_ids
        self.background = nn.ParameterDict({c: nn.Parameter(torch.randn(hidden) * 0.02) for c in CATEGORIES})
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.centre = nn.Linear(hidden, 2)
        # plain linear read-outs beside the prototype ones: measured (scripts/shape_probe.py), a tower
        # learns shape in ~600 steps under a linear head, while the prototype head alone left it at
        # chance after 1,100; the prototype head still aligns the features with the LM's words
        n_classes = {c: 1 + len(ids) for c, ids in class_token_ids.items()}
        self.linear = nn.ModuleDict({c: nn.Linear(hidden, n_classes[c]) for c in CATEGORIES})

    def prototypes(self, category: str, embed: torch.Tensor) -> torch.Tensor:
        """[n_classes, D]: background, then the mean embedding of each class word's tokens."""
        rows = [self.background[category]]
        rows += [embed[torch.tensor(ids)].mean(0) for ids in self.class_token_ids[category]]
        return torch.stack(rows)

    def loss(self, feats: torch.Tensor, targets: dict[str, torch.Tensor],
             embed: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Sum of the per-category cross-entropies (background and foreground tokens weighted
        half each) plus the centre regression (object tokens).

        ``feats``: [B, N, D]; ``targets``: each [B, N] (``centre`` [B, N, 2]); ``embed``:
        the LM's input embedding matrix. Returns the loss and per-category accuracies on
        foreground tokens (for the training log).
        """
        feats = feats.float()
        unit = F.normalize(feats, dim=-1)
        total = feats.new_zeros(())
        acc: dict[str, float] = {}
        for c in CATEGORIES:
            protos = F.normalize(self.prototypes(c, embed.float()), dim=-1)
            logits = self.log_scale.exp() * unit @ protos.T
            tgt = targets[c]
            fg = tgt > 0
            linear = self.linear[c](feats)
            total = total + _balanced_ce(logits, tgt, fg) + _balanced_ce(linear, tgt, fg)
            if fg.any():
                acc[c] = float((logits.argmax(-1)[fg] == tgt[fg]).float().mean())
                if c == "shape":
                    acc["shape_lin"] = float((linear.argmax(-1)[fg] == tgt[fg]).float().mean())
        obj = targets["shape"] > 0
        if obj.any():
            total = total + 10.0 * F.mse_loss(self.centre(feats)[obj], targets["centre"][obj])
        return total, acc


def _balanced_ce(logits: torch.Tensor, tgt: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with background and foreground tokens weighing half each: most tokens are
    background, and an unweighted mean gives an object's shape (which needs context) almost no gradient."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none").view_as(tgt)
    if fg.any() and (~fg).any():
        return (ce[fg].mean() + ce[~fg].mean()) / 2
    return ce.mean()


def class_token_ids(tokenizer: Any) -> dict[str, list[list[int]]]:
    """Token ids of each class word of each category, spelled as inside a question (" red")."""
    names = {"shape": list(SHAPES), "colour": list(COLOURS), "size": list(SIZES), "word": list(WORDS)}
    return {c: [tokenizer(" " + w, add_special_tokens=False).input_ids for w in ws] for c, ws in names.items()}


def stack_labels(labels: list[PatchLabels]) -> dict[str, torch.Tensor]:
    """Batch per-image :class:`PatchLabels` into flat-token tensors ([B, grid*grid])."""
    out: dict[str, torch.Tensor] = {}
    for c in CATEGORIES:
        out[c] = torch.from_numpy(np.stack([getattr(l, c).reshape(-1) for l in labels]))
    out["centre"] = torch.from_numpy(np.stack([l.centre.reshape(-1, 2) for l in labels]))
    return out


class FeatureCapture:
    """Forward hook that keeps the image features handed to the LM (per-instance hook)."""

    def __init__(self, model: Any, qwen: bool):
        self.qwen = qwen
        module = model.model.visual.merger if qwen else model.model.multi_modal_projector
        self.feats: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.feats = output

    def take(self, batch: int) -> torch.Tensor:
        """The captured features as [B, N, D] (and forget them)."""
        f, self.feats = self.feats, None
        if f is None:
            raise RuntimeError("no image features were captured; did the forward see pixel_values?")
        return f.reshape(batch, -1, f.shape[-1])

    def remove(self) -> None:
        self._handle.remove()


def image_features_only(model: Any, batch: dict[str, torch.Tensor], qwen: bool) -> None:
    """Run just the vision path (the capture hook records the features)."""
    if qwen:
        model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    else:
        model.model.get_image_features(
            pixel_values=batch["pixel_values"],
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        )
