"""How a forward relates to the last pruned prompt (the decision belongs to the prompt).

A fresh forward (empty cache) *continues* the prompt when, row by row, it starts with the prompt's ids, is
longer, has the same padding and carries the same image inputs: ``use_cache=False`` steps and a conversation
run again without its cache. Such a forward reuses the prompt's decision instead of making a new one.
"""
from __future__ import annotations

from typing import Any

import torch

IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "image_sizes", "pixel_values_videos", "video_grid_thw")

ImageInputs = list[tuple[str, Any]]


def image_inputs(kwargs: dict[str, Any]) -> ImageInputs:
    """The image inputs of a forward (raw or pre-encoded), to tell the same prompt's images from new ones."""
    found: ImageInputs = [(k, kwargs[k]) for k in IMAGE_INPUTS if kwargs.get(k) is not None]
    enc = kwargs.get("mm_encoder_outputs") or {}
    for modality in sorted(enc):
        if enc[modality] is not None:
            found.append((f"mm_encoder_outputs.{modality}", tuple(enc[modality].pooler_output)))
    return found


def continues_prompt(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor | None, prompt_images: ImageInputs,
                     ids: torch.Tensor, mask: torch.Tensor | None, images: ImageInputs) -> bool:
    """Whether ``ids`` (with its 2-D ``mask`` and ``images``) extends the prompt in every batch row."""
    if prompt_ids.device != ids.device or ids.shape[0] != prompt_ids.shape[0]:
        return False
    length = prompt_ids.shape[1]
    if ids.shape[1] <= length or not torch.equal(ids[:, :length], prompt_ids):
        return False
    if (mask is None) != (prompt_mask is None):  # a missing mask means "no padding"
        given = mask[:, :length] if mask is not None else prompt_mask
        if not bool(given.bool().all()):
            return False
    elif mask is not None and not torch.equal(mask[:, :length].bool(), prompt_mask.bool()):
        return False
    return _same_images(images, prompt_images)


def drop_leading(kwargs: dict[str, Any], n: int) -> dict[str, Any]:
    """Drop the first ``n`` tokens of every per-token input (the attention mask keeps its full width)."""
    out = dict(kwargs)
    for key in ("input_ids", "position_ids", "mm_token_type_ids"):
        if isinstance(out.get(key), torch.Tensor):
            out[key] = out[key][..., n:]
    if isinstance(out.get("inputs_embeds"), torch.Tensor):
        out["inputs_embeds"] = out["inputs_embeds"][:, n:]
    return out


def _same_images(a: ImageInputs, b: ImageInputs) -> bool:
    if [k for k, _ in a] != [k for k, _ in b]:
        return False
    return all(_same_tensors(x, y) for (_, x), (_, y) in zip(a, b))


def _same_tensors(x: Any, y: Any) -> bool:
    if isinstance(x, tuple):
        return isinstance(y, tuple) and len(x) == len(y) and all(_same_tensors(i, j) for i, j in zip(x, y))
    if x is y:
        return True
    return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape \
        and x.device == y.device and torch.equal(x, y)
