"""The projector's input row of every visual token, and the projector as a row-wise callable.

Pruners that probe the vision-language projector (ZOO-Prune perturbs its input and measures its output)
need, per visual token the LLM would see, the vector the projector consumed and a function mapping such
rows to projected features. The host's feature call runs with a forward hook on the projector module
that records its input, so the vision tower runs once. Per family:

- LLaVA-1.5: the projector MLP's input is one CLIP patch feature per token (the order of the tokens).
- LLaVA-NeXT: the same per crop patch; packing (unpadding, newline tokens) happens after the projector, so
  the mapping to tokens is found by packing each row's index. Newline tokens have no projector input
  (``valid`` is False there: their projected feature is a constant).
- Qwen2-VL: the PatchMerger's input is the 2x2 group of ViT patches of a merged token (4 x d_v values).
- Qwen2.5-VL: the same, but the tower works in window order and reorders the merged tokens after the
  merger; the window index of ``transformers.vision_utils`` gives that order.

Every probe is checked once: the callable applied to the rows must reproduce the image features.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..core.errors import UnsupportedModelError


@dataclasses.dataclass
class ProjectorRows:
    """One image: the projector input per visual token ([N, d_in]; zeros where ``valid`` is False)."""

    rows: torch.Tensor
    valid: torch.Tensor


def projector_module(adapter: Any) -> torch.nn.Module:
    """The module whose input is perturbed: the MLP projector (LLaVA) or the PatchMerger (Qwen)."""
    if adapter.family in ("llava", "llava_next"):
        return adapter.inner.multi_modal_projector
    return adapter.inner.visual.merger


def projector_fn(adapter: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """Row-wise projector: ``[R, d_in] -> [R, D]`` (Qwen: a row is a merged token's 2x2 patches, flattened)."""
    module = projector_module(adapter)
    if adapter.family in ("llava", "llava_next"):
        return module
    unit = adapter.inner.visual.config.embed_dim if hasattr(adapter.inner.visual.config, "embed_dim") \
        else adapter.inner.visual.config.hidden_size

    def merged(rows: torch.Tensor) -> torch.Tensor:
        return module(rows.reshape(-1, unit))
    return merged


@contextlib.contextmanager
def capture_projector_input(adapter: Any) -> Iterator[list[torch.Tensor]]:
    """Records the projector's (first positional) input of every call inside the block."""
    seen: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple) -> None:
        seen.append(args[0].detach())

    handle = projector_module(adapter).register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def features_and_rows(adapter: Any, kwargs: dict[str, Any]) -> tuple[list[torch.Tensor], list[ProjectorRows]]:
    """The host's per-image features plus each image's :class:`ProjectorRows` (one vision-tower run)."""
    with capture_projector_input(adapter) as seen:
        feats = adapter.image_features(kwargs)
    if len(seen) != 1:
        raise UnsupportedModelError(f"{adapter.family}: expected one projector call per feature pass, saw {len(seen)}; "
                                    "this pruner needs the projector's input and cannot find it in this model")
    x = seen[0]
    if adapter.family == "llava":
        rows = [ProjectorRows(r, torch.ones(r.shape[0], dtype=torch.bool, device=r.device)) for r in x]
    elif adapter.family == "llava_next":
        rows = _next_rows(adapter, kwargs, x)
    else:
        rows = _qwen_rows(adapter, kwargs, x)
    _check(adapter, feats, rows)
    return feats, rows


def _next_rows(adapter: Any, kwargs: dict[str, Any], x: torch.Tensor) -> list[ProjectorRows]:
    """LLaVA-NeXT: pack each projector row's index the way the features are packed (newlines -> -1)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    inner, sizes = adapter.inner, kwargs["image_sizes"]
    crops = [image_size_to_num_patches(image_size=s, grid_pinpoints=inner.config.image_grid_pinpoints,
                                       patch_size=inner.config.vision_config.image_size) for s in sizes]
    flat = x.reshape(-1, x.shape[-1])
    index = torch.arange(flat.shape[0], dtype=torch.float64, device=x.device).reshape(x.shape[0], x.shape[1], 1)
    strategy = kwargs.get("vision_feature_select_strategy") or inner.config.vision_feature_select_strategy
    packed, _ = inner.pack_image_features(list(torch.split(index, crops, dim=0)), sizes, strategy,
                                          image_newline=torch.full((1,), -1.0, dtype=torch.float64, device=x.device))
    out = []
    for image in packed:  # one [n_tokens, 1] index column per image
        ids = image.squeeze(-1).round().long()
        valid = ids >= 0
        out.append(ProjectorRows(torch.where(valid[:, None], flat[ids.clamp_min(0)], 0.0), valid))
    return out


def _qwen_rows(adapter: Any, kwargs: dict[str, Any], x: torch.Tensor) -> list[ProjectorRows]:
    """Qwen2-VL / 2.5-VL: one row per merged token (its 2x2 patches), in the order of the image tokens."""
    visual = adapter.inner.visual
    unit = x.shape[-1]
    merge = visual.spatial_merge_size
    rows = x.reshape(-1, unit * merge * merge)
    grid = kwargs["image_grid_thw"]
    if adapter.family == "qwen2_5_vl":
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(grid, spatial_merge_size=merge, window_size=visual.window_size,
                                                  patch_size=visual.patch_size, kwargs={})
        rows = rows[torch.argsort(window_index.to(rows.device))]
    sizes = (grid.prod(-1) // merge**2).tolist()
    return [ProjectorRows(r, torch.ones(r.shape[0], dtype=torch.bool, device=r.device))
            for r in torch.split(rows, sizes)]


@torch.no_grad()
def _check(adapter: Any, feats: list[torch.Tensor], rows: list[ProjectorRows]) -> None:
    """The callable on the rows must give the features the LLM receives (else the mapping is wrong)."""
    fn = projector_fn(adapter)
    if len(feats) != len(rows):
        raise UnsupportedModelError(f"{adapter.family}: {len(rows)} images of projector rows for {len(feats)} images")
    for f, r in zip(feats, rows):
        got = fn(r.rows[r.valid])
        if got.shape != f[r.valid].shape or not torch.allclose(got, f[r.valid], atol=1e-4, rtol=1e-3):
            raise UnsupportedModelError(
                f"{adapter.family}: the projector applied to its recorded input does not reproduce the image "
                "features; this model's vision path is not supported by projector-probing pruners (e.g. zooprune)")
