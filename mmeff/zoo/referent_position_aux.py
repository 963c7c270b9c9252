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

import copy
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


class _EagerHeadCapture(nn.Module):
    """One decoder layer's attention weights, for losses on where a head looks.

    Only that layer runs eager attention (a per-instance copy of its config, restored by
    :meth:`remove`), so its weights exist; the other layers keep their implementation.
    """

    def __init__(self, model: Any, layer: int, heads: tuple[int, ...], what: str):
        super().__init__()
        layers = decoder_layers(model)
        if not 0 <= layer < len(layers):
            raise ValueError(f"{what} layer must be in [0, {len(layers)}), got {layer}")
        n_heads = model.config.text_config.num_attention_heads
        for head in heads:
            if not 0 <= head < n_heads:
                raise ValueError(f"{what} head must be in [0, {n_heads}), got {head}")
        self.layer = layer
        self._attn = layers[layer].self_attn
        self._config = self._attn.config
        eager = copy.copy(self._config)
        eager._attn_implementation = "eager"
        self._attn.config = eager
        self.weights: torch.Tensor | None = None
        self._handles = [self._attn.register_forward_pre_hook(self._additive_mask, with_kwargs=True),
                         self._attn.register_forward_hook(self._hook)]

    @staticmethod
    def _additive_mask(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """The model builds its mask for the other layers' implementation (SDPA takes booleans;
        isolated turns pass a boolean 4-D mask); eager attention adds the mask to the scores."""
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dtype == torch.bool:
            q = kwargs["hidden_states"]
            kwargs["attention_mask"] = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~mask, torch.finfo(q.dtype).min)
        return args, kwargs

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.weights = output[1]

    def take(self) -> torch.Tensor:
        weights, self.weights = self.weights, None
        if weights is None:
            raise RuntimeError("no attention weights were captured; did the forward run?")
        return weights

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._attn.config = self._config


class ReferentAttentionAux(_EagerHeadCapture):
    """Teaches one attention head to *point* at the object a position question's phrase names.

    Measured on the stage-4 tiny-qwen2-vl (``scripts/referent_probe.py``): no decoder layer holds
    either named object's position, neither at the phrase ends nor at the final token (held-out
    R^2 < 0 everywhere), and the position read-out above stayed at R^2 ~0 for 270 steps: the
    look-up itself is missing, and a read-out's gradient through diffuse attention barely moves it.
    This loss supervises the look-up directly: at each phrase's last token, head ``head`` of
    decoder layer ``layer`` must put its attention mass on that object's image tokens
    (-log of the mass).
    """

    def __init__(self, model: Any, layer: int, head: int, image_token_id: int):
        super().__init__(model, layer, (head,), "referent attention")
        self.head, self.image_token_id = head, image_token_id

    def loss(self, input_ids: torch.Tensor, index: torch.Tensor, xy: torch.Tensor,
             radius: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean -log(attention mass on the object's image tokens) over the referents ``index``
        ``[N, 2]`` = (sample, token) with object centres ``xy`` ``[N, 2]`` and half-extents
        ``radius`` ``[N]``; logs the mean mass."""
        weights = self.take()
        if index.numel() == 0:
            return weights.sum() * 0.0, {}
        rows = weights[index[:, 0], self.head, index[:, 1]]  # [N, T]
        on_object = object_token_mask(input_ids, self.image_token_id, index[:, 0], xy, radius)
        mass = (rows * on_object).sum(-1)
        loss = -torch.log(mass.clamp_min(1e-6)).mean()
        return loss, {"ref_attn_mass": float(mass.detach().mean())}


class PhraseGatherAux(_EagerHeadCapture):
    """Teaches two heads of one layer to *gather* both named objects at the question's final token.

    Measured on tiny-llava after 29 min of pointer + centre + comparison losses
    (``scripts/referent_probe.py``, 288 val scenes): both centres are at their phrase ends from
    layer 3 (held-out R^2 0.5-0.6), yet nothing of A, B or A - B reaches the final
    ``<|assistant|>`` token at any layer (R^2 < 0), and the comparison read-out stayed at R^2 0.
    The gather is missing. This loss supervises it: at the final token, head ``heads[0]`` must
    attend to A's phrase end and ``heads[1]`` to B's (-log of the weight on that token).
    """

    def __init__(self, model: Any, layer: int, heads: tuple[int, int]):
        if len(heads) != 2 or heads[0] == heads[1]:
            raise ValueError(f"phrase gather needs two different heads (one per object), got {heads}")
        super().__init__(model, layer, tuple(heads), "phrase gather")
        self.heads = tuple(heads)

    def loss(self, referent_index: torch.Tensor, final_index: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """``referent_index`` ``[2N, 2]`` = (sample, token) of A's then B's phrase end per question,
        ``final_index`` ``[N, 2]`` the questions' final tokens; mean -log weight, logs the mean weight."""
        if referent_index.shape[0] != 2 * final_index.shape[0]:
            raise ValueError(f"need two referents per final token, got {referent_index.shape[0]} and {final_index.shape[0]}")
        weights = self.take()
        if final_index.numel() == 0:
            return weights.sum() * 0.0, {}
        b, q = final_index[:, 0], final_index[:, 1]
        w_a = weights[b, self.heads[0], q, referent_index[0::2, 1]]
        w_b = weights[b, self.heads[1], q, referent_index[1::2, 1]]
        w = torch.cat([w_a, w_b])
        loss = -torch.log(w.clamp_min(1e-6)).mean()
        return loss, {"gather_w": float(w.detach().mean())}


def object_token_mask(input_ids: torch.Tensor, image_token_id: int, sample: torch.Tensor, xy: torch.Tensor,
                      radius: torch.Tensor) -> torch.Tensor:
    """``[N, T]`` float mask of the image tokens (a square raster grid per sample) whose cell
    lies within each object's box (centre ``xy``, half-extent ``radius``, at least half a cell)."""
    is_image = input_ids[sample] == image_token_id  # [N, T]
    n = int(is_image[0].sum())
    side = int(round(n ** 0.5))
    if side * side != n or bool((is_image.sum(-1) != n).any()):
        raise ValueError("every sample must hold one square grid of image tokens")
    k = torch.arange(n, device=input_ids.device)
    centre = torch.stack([(k % side + 0.5) / side, (k // side + 0.5) / side], -1)  # [n, (x, y)]
    reach = radius.to(centre).clamp_min(0.5 / side)[:, None, None]
    inside = ((centre[None] - xy.to(centre)[:, None]).abs() <= reach).all(-1)  # [N, n]
    mask = torch.zeros(is_image.shape, dtype=centre.dtype, device=input_ids.device)
    mask[is_image] = inside.to(mask.dtype).reshape(-1)
    return mask
