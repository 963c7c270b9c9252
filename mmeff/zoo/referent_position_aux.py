"""Training-only read-out of a position question's referents' centres from one LM layer.

Measured on the stage-4 tiny-qwen2-vl (2026-11-23): the LM *has* every image token's grid
position (the layer-1 read-out of :mod:`mmeff.zoo.lm_position_aux` reaches R^2 0.99), and it
can look an object up by its words (colour 0.99 on "What colour is the circle?"), yet position
questions stay at chance: it answers "above" / "right" whatever the scene. The binary answer
is too weak a signal to teach "look up both objects, then compare their coordinates". This
head supervises the middle step densely: at the last token of each object phrase of a
position question ("Is the *red circle* left of the *blue square*?"), a linear map from the
hidden state after decoder layer ``layer`` must give that object's centre (x, y) in [0, 1].
The answer's comparison is then one subtraction the layers above can learn. Like the other
auxiliary heads it is a forward hook plus a loss, never saved with the model.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .lm_position_aux import decoder_layers


class ReferentPositionAux(nn.Module):
    """Linear (x, y) read-out of referenced objects' centres at their phrase's last token."""

    def __init__(self, model: Any, layer: int):
        super().__init__()
        layers = decoder_layers(model)
        if not 0 <= layer < len(layers):
            raise ValueError(f"referent position layer must be in [0, {len(layers)}), got {layer}")
        self.layer = layer
        self.head = nn.Linear(model.config.text_config.hidden_size, 2)
        self.hidden: torch.Tensor | None = None
        self._handle = layers[layer].register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.hidden = output[0] if isinstance(output, tuple) else output

    def loss(self, index: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """MSE (x10) of the predicted centres at ``index`` ``[N, 2]`` = (sample, token) against
        ``target`` ``[N, 2]`` = (x, y); with N = 0 (no position question) the loss is 0 and
        still part of the graph. Also returns R^2 per axis for the log."""
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            raise RuntimeError("no LM hidden states were captured; did the forward run?")
        if index.ndim != 2 or index.shape[-1] != 2 or target.shape != index.shape:
            raise ValueError(f"index and target must both be [N, 2], got {tuple(index.shape)} and {tuple(target.shape)}")
        if index.numel() == 0:
            return hidden.sum() * 0.0, {}
        pred = self.head(hidden[index[:, 0], index[:, 1]].float())
        target = target.to(pred)
        loss = 10.0 * F.mse_loss(pred, target)
        with torch.no_grad():
            var = ((target - target.mean(0)) ** 2).sum(0).clamp_min(1e-9)
            r2 = 1 - ((pred - target) ** 2).sum(0) / var
        return loss, {"ref_x_r2": float(r2[0]), "ref_y_r2": float(r2[1])}

    def remove(self) -> None:
        self._handle.remove()


def referent_token_ends(question: str, phrase_a: str, phrase_b: str) -> tuple[int, int]:
    """Character offsets just past ``phrase_a`` and ``phrase_b`` in a position question
    ("Is the {a} ... the {b}?"): the first "the {a}" and the last "the {b}"."""
    start_a = question.find(f"the {phrase_a} ")
    start_b = question.rfind(f"the {phrase_b}?")
    if start_a < 0 or start_b < 0 or start_b <= start_a:
        raise ValueError(f"cannot find the object phrases {phrase_a!r} and {phrase_b!r} in {question!r}")
    return start_a + 4 + len(phrase_a), start_b + 4 + len(phrase_b)
