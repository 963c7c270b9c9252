"""Lay VFlowOpt's per-patch importance out in the order of each image's LLM visual tokens.

For every image the result is an :class:`ImageMap`: importance [T], grid coordinates [T, 2] and a region id
[T] (cells never straddle regions), where T is that image's number of placeholder tokens.
- LLaVA-1.5: one crop, T = N patches, region 0.
- LLaVA-NeXT (anyres): each crop's map goes through the model's own ``pack_image_features`` (the same
  unpadding as the features); the newline column gets importance 1 (as in the released code). The base image
  is region 0 on its own grid; the packed crops are region 1, on the packed map (newline column included).
- Qwen2-VL / 2.5-VL: LLM tokens are the merged 2x2 patches. A merged token's relevance is the sum over its
  patches (so it still sums to 1 per attention block); its entropy is taken over all its pixels; cells are
  defined on the merged grid. Qwen2.5-VL's window permutation is undone first.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..core.errors import ConfigError
from ..pruners.vflowopt_math import combine, grey_levels, histogram_entropy


@dataclasses.dataclass(frozen=True)
class ImageMap:
    importance: torch.Tensor  # [T] float32
    coords: torch.Tensor      # [T, 2] (row, col)
    region: torch.Tensor      # [T] long


def _grid(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    r = torch.arange(rows, device=device).repeat_interleave(cols)
    c = torch.arange(cols, device=device).repeat(rows)
    return torch.stack([r, c], 1)


def clip_patch_entropy(pixels: torch.Tensor, patch: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[crops, N] grey-histogram entropy of each patch of each crop [crops, 3, H, W] (row-major patches)."""
    crops, chans, height, width = pixels.shape
    tiles = pixels.unfold(2, patch, patch).unfold(3, patch, patch)          # [crops, C, h, w, p, p]
    tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(crops * (height // patch) * (width // patch), chans, -1)
    levels = grey_levels(tiles, mean, std, channel_dim=1)
    return histogram_entropy(levels).view(crops, -1)


def llava_maps(model: torch.nn.Module, family: str, kwargs: dict[str, Any], relevance: torch.Tensor,
               alpha_v: float, mean: tuple[float, ...], std: tuple[float, ...]) -> list[ImageMap]:
    """Per image maps for LLaVA-1.5 / NeXT from the probe's [crops, N] relevance."""
    if getattr(model.config, "vision_feature_select_strategy", "default") != "default":
        raise ConfigError("vflowopt supports vision_feature_select_strategy='default' (patch tokens only, as in "
                          "LLaVA-1.5/NeXT); this model keeps the CLS token among its features")
    vc = model.config.vision_config
    side = vc.image_size // vc.patch_size
    pixels = kwargs["pixel_values"]
    if family == "llava":
        entropy = clip_patch_entropy(pixels, vc.patch_size, mean, std) if alpha_v else torch.zeros_like(relevance)
        coords = _grid(side, side, relevance.device)
        region = torch.zeros(side * side, dtype=torch.long, device=relevance.device)
        return [ImageMap(combine(relevance[i], entropy[i], alpha_v), coords, region) for i in range(relevance.shape[0])]
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    sizes = kwargs["image_sizes"]
    counts = [image_size_to_num_patches(image_size=s, grid_pinpoints=model.config.image_grid_pinpoints,
                                        patch_size=vc.image_size) for s in sizes]
    crops = torch.cat([pv[:n] for pv, n in zip(pixels, counts)]) if pixels.dim() == 5 else pixels
    entropy = clip_patch_entropy(crops, vc.patch_size, mean, std) if alpha_v else torch.zeros_like(relevance)
    imp = torch.stack([combine(relevance[i], entropy[i], alpha_v) for i in range(relevance.shape[0])])
    # channels: importance, newline flag, zero; the newline "feature" is (1, 1, 0)
    feats = torch.stack([imp, torch.zeros_like(imp), torch.zeros_like(imp)], -1)
    newline = torch.tensor([1.0, 1.0, 0.0], device=imp.device)
    packed, _ = model.model.pack_image_features(list(torch.split(feats, counts)), sizes, "default", image_newline=newline)
    maps = []
    n_base = side * side
    for p in packed:
        total = p.shape[0]
        coords = torch.zeros(total, 2, dtype=torch.long, device=p.device)
        region = torch.ones(total, dtype=torch.long, device=p.device)
        coords[:n_base] = _grid(side, side, p.device)
        region[:n_base] = 0
        rest = total - n_base
        lines = int(p[n_base:, 1].sum().round())
        if rest > 0 and lines > 0:
            width = rest // lines
            idx = torch.arange(rest, device=p.device)
            coords[n_base:] = torch.stack([idx // width, idx % width], 1)
        maps.append(ImageMap(p[:, 0].float(), coords, region))
    return maps


def qwen_maps(model: torch.nn.Module, family: str, kwargs: dict[str, Any], relevance: torch.Tensor,
              alpha_v: float, mean: tuple[float, ...], std: tuple[float, ...]) -> list[ImageMap]:
    """Per image maps on the merged grid from the probe's [S] relevance (layer order)."""
    visual = model.model.visual
    merge = visual.spatial_merge_size
    unit = merge * merge
    grid = kwargs["image_grid_thw"]
    rel = relevance.view(-1, unit).sum(-1)
    if family == "qwen2_5_vl":
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(grid, spatial_merge_size=merge, window_size=visual.window_size,
                                                  patch_size=visual.patch_size)
        rel = rel[torch.argsort(window_index.to(rel.device))]
    if alpha_v:
        vc = model.config.vision_config
        pix = kwargs["pixel_values"].view(rel.shape[0], unit, getattr(vc, "in_channels", 3), -1)
        levels = grey_levels(pix, mean, std, channel_dim=2).reshape(rel.shape[0], -1)
        entropy = histogram_entropy(levels)
    else:
        entropy = torch.zeros_like(rel)
    maps, start = [], 0
    for t, h, w in grid.tolist():
        hm, wm = h // merge, w // merge
        n = t * hm * wm
        j = torch.arange(n, device=rel.device)
        coords = torch.stack([(j // wm) % hm, j % wm], 1)
        maps.append(ImageMap(combine(rel[start:start + n], entropy[start:start + n], alpha_v), coords, j // (hm * wm)))
        start += n
    return maps
