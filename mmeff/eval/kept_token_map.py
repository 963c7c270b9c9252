"""Kept-token heatmaps: which image patches a pruner kept, drawn over the image the model saw.

A pruner's choice is reported by ``Handle.report()["kept_visual_index"]`` (per sample, indices into
that sample's visual tokens, in prompt order). This module turns one sample's indices into a
per-image boolean grid and draws it:

- LLaVA-1.5 (one square grid per image, 576 tokens at 336 px / patch 14): the processor resizes the
  short side and centre-crops, so the overlay is drawn on the centre-cropped square;
- Qwen2-VL / Qwen2.5-VL: one token per merged 2x2 patch, the grid is ``image_grid_thw // merge``;
  the processor resizes without cropping, so the overlay is drawn on the whole image.

LLaVA-NeXT's any-resolution layout (base view + tiles + newline tokens) and video inputs are refused
with a clear error rather than drawn wrongly.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, ImageDraw

KEPT_EDGE = (255, 200, 0)


def image_grids(model: Any, inputs: dict[str, Any], sample: int = 0) -> list[tuple[int, int]]:
    """(rows, cols) of visual tokens for each image of ``sample``, in prompt order."""
    model_type = getattr(model.config, "model_type", "")
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        thw = inputs.get("image_grid_thw")
        if thw is None:
            raise ValueError("kept-token maps need the processor's image_grid_thw for Qwen-VL inputs")
        merge = int(model.config.vision_config.spatial_merge_size)
        per_sample = _images_per_sample(model, inputs)
        start = sum(per_sample[:sample])
        rows = thw[start:start + per_sample[sample]].tolist()
        if any(int(t) != 1 for t, _, _ in rows):
            raise ValueError("kept-token maps are drawn for still images only (this input has temporal frames)")
        return [(int(h) // merge, int(w) // merge) for _, h, w in rows]
    if model_type == "llava":
        n_images = _images_per_sample(model, inputs)[sample]
        ids = inputs["input_ids"][sample]
        per_image = int((ids == model.config.image_token_id).sum()) // max(1, n_images)
        side = math.isqrt(per_image)
        if side * side != per_image:
            raise ValueError(f"LLaVA image with {per_image} tokens is not one square grid")
        return [(side, side)] * n_images
    raise ValueError(
        f"kept-token maps support LLaVA-1.5 and Qwen2-VL / Qwen2.5-VL, not model_type {model_type!r} "
        "(LLaVA-NeXT's tiled layout has no single grid)"
    )


def _images_per_sample(model: Any, inputs: dict[str, Any]) -> list[int]:
    """Images per sample, counted from the image start/placeholder runs of ``input_ids``."""
    ids = inputs["input_ids"]
    token = model.config.image_token_id
    counts = []
    for row in ids:
        is_img = (row == token).to(torch.int8)
        starts = int(((is_img[1:] - is_img[:-1]) == 1).sum()) + int(is_img[0])
        counts.append(starts)
    return counts


def kept_grids(kept: Sequence[int], grids: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Split one sample's kept indices (over all its visual tokens) into a bool grid per image."""
    sizes = [h * w for h, w in grids]
    total = sum(sizes)
    mask = torch.zeros(total, dtype=torch.bool)
    idx = torch.as_tensor(list(kept), dtype=torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= total):
        raise ValueError(f"kept index out of range for {total} visual tokens")
    mask[idx] = True
    out, start = [], 0
    for (h, w), n in zip(grids, sizes):
        out.append(mask[start:start + n].view(h, w))
        start += n
    return out


def model_view(image: Image.Image, model_type: str) -> Image.Image:
    """The part of ``image`` the model's grid covers (LLaVA-1.5 centre-crops to a square)."""
    image = image.convert("RGB")
    if model_type != "llava":
        return image
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s))


def draw_kept(image: Image.Image, grid: torch.Tensor, *, dim: float = 0.25, size: int = 336) -> Image.Image:
    """``image`` resized so its long side is ``size``; dropped patches darkened to ``dim``, kept ones outlined."""
    w, h = image.size
    scale = size / max(w, h)
    base = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    rows, cols = grid.shape
    small = Image.fromarray((grid.numpy().astype("uint8") * 255), mode="L")
    mask = small.resize(base.size, Image.NEAREST)
    dark = base.point(lambda v: int(v * dim))
    out = Image.composite(base, dark, mask)
    draw = ImageDraw.Draw(out)
    cw, ch = base.size[0] / cols, base.size[1] / rows
    for r, c in grid.nonzero().tolist():
        draw.rectangle([c * cw, r * ch, (c + 1) * cw - 1, (r + 1) * ch - 1], outline=KEPT_EDGE)
    return out


def kept_token_maps(model: Any, inputs: dict[str, Any], report: dict[str, Any], images: Sequence[Image.Image],
                    sample: int = 0) -> list[Image.Image]:
    """One overlay per image of ``sample`` from a handle's report after a pruned forward."""
    kept_all = report.get("kept_visual_index")
    if not kept_all:
        raise ValueError("the report has no kept_visual_index: run a pruned forward before drawing")
    grids = image_grids(model, inputs, sample)
    if len(images) != len(grids):
        raise ValueError(f"sample {sample} has {len(grids)} images in the prompt but {len(images)} were given")
    model_type = model.config.model_type
    return [draw_kept(model_view(img, model_type), g)
            for img, g in zip(images, kept_grids(kept_all[sample], grids))]
