"""Training-only read-out of every image token's grid position from one LM layer.

Measured on the shipped tiny-qwen2-vl (2026-11-23): a linear probe on the merger output
recovers neither a token's own grid position nor its object's centre (held-out R^2 about 0 on
both axes). Qwen2-VL's tower has only relative (rotary) positions, and a translation-equivariant
tower cannot put absolute position into the features of uniform backgrounds at all, so "is A
left of B?" has nothing to compare. The LM can compute absolute position (causal attention
over the raster-ordered image tokens, plus M-RoPE), but the answer loss alone has not taught it
to. This head asks for it directly: a linear map from the hidden state of image token k after
decoder layer ``layer`` to its (row, column) on the token grid, both scaled to [0, 1]. It is a
forward hook plus a loss, never saved with the model (which stays a stock class).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def decoder_layers(model: Any) -> nn.ModuleList:
    """The LM's decoder layers of a LLaVA / Qwen2-VL model (transformers 5 layout)."""
    lm = model.model.language_model
    return lm.layers


class LMPositionAux(nn.Module):
    """Linear (row, column) read-out of image tokens from decoder layer ``layer``'s output."""

    def __init__(self, model: Any, layer: int, image_token_id: int):
        super().__init__()
        layers = decoder_layers(model)
        if not 0 <= layer < len(layers):
            raise ValueError(f"lm position layer must be in [0, {len(layers)}), got {layer}")
        self.layer, self.image_token_id = layer, image_token_id
        self.head = nn.Linear(model.config.text_config.hidden_size, 2)
        self.hidden: torch.Tensor | None = None
        self._handle = layers[layer].register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.hidden = output[0] if isinstance(output, tuple) else output

    def loss(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """MSE of the predicted grid positions (x10, like the centre loss) and R^2 per axis for the log."""
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            raise RuntimeError("no LM hidden states were captured; did the forward run?")
        mask = input_ids == self.image_token_id
        per_sample = mask.sum(1)
        if per_sample.numel() == 0 or int(per_sample.min()) == 0 or bool((per_sample != per_sample[0]).any()):
            raise ValueError("every sample must hold one image with the same number of image tokens")
        n = int(per_sample[0])
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"the image tokens must form a square grid, got {n}")
        k = torch.arange(n, device=hidden.device).repeat(input_ids.shape[0])
        target = torch.stack([k // side, k % side], -1).float() / max(side - 1, 1)
        pred = self.head(hidden[mask].float())
        loss = 10.0 * F.mse_loss(pred, target)
        with torch.no_grad():
            r2 = 1 - ((pred - target) ** 2).sum(0) / ((target - target.mean(0)) ** 2).sum(0).clamp_min(1e-9)
        return loss, {"row_r2": float(r2[0]), "col_r2": float(r2[1])}

    def remove(self) -> None:
        self._handle.remove()
