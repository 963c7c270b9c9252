"""Where things are in each supported diffusers DiT: attention sites, token layout, batch inputs, CFG style.

This is data, not code paths: one :class:`FamilyLayout` per transformer class. The adapter reads it to find
attention modules (role, layer index, heads), to place text tokens in joint sequences (first or last), to
compute the latent token grid (T, H, W) after patchify from the transformer's inputs, to know which forward
arguments are batch-major (for the perturbed guidance branch), and how the stock pipeline runs CFG:
``"batched"`` = one call on [uncond, cond] rows, ``"sequential"`` = a cond call then an uncond call on the
same latents.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ..core.errors import UnsupportedModelError
from .dit_context import AttnSite

Grid = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class FamilyLayout:
    family: str
    model_class: str
    blocks: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]  # (block list attr, ((attn attr, role), ...))
    text_position: str | None                                     # in joint sequences: "first" | "last"
    cfg: str                                                      # "batched" | "sequential"
    batch_keys: tuple[str, ...]
    grid: Callable[[torch.nn.Module, dict[str, Any]], Grid]


def _hw(shape_h: int, shape_w: int, p: int) -> tuple[int, int]:
    return shape_h // p, shape_w // p


def _grid_image(model: torch.nn.Module, kw: dict[str, Any]) -> Grid:
    x = kw["hidden_states"]                                       # [B, C, H, W]
    h, w = _hw(x.shape[-2], x.shape[-1], int(model.config.patch_size))
    return 1, h, w


def _grid_flux(model: torch.nn.Module, kw: dict[str, Any]) -> Grid:
    n = int(kw["hidden_states"].shape[1])                         # packed [B, N, C]
    ids = kw.get("img_ids")
    if isinstance(ids, torch.Tensor) and ids.shape[-2] == n:
        ids = ids.reshape(-1, ids.shape[-1])[:n]
        h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        if h * w == n:
            return 1, h, w
    return 1, 1, n


def _grid_wan(model: torch.nn.Module, kw: dict[str, Any]) -> Grid:
    x = kw["hidden_states"]                                       # [B, C, F, H, W]
    pt, ph, pw = model.config.patch_size
    return x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw


def _grid_hunyuan(model: torch.nn.Module, kw: dict[str, Any]) -> Grid:
    x = kw["hidden_states"]                                       # [B, C, F, H, W]
    p, pt = int(model.config.patch_size), int(model.config.patch_size_t)
    return x.shape[2] // pt, x.shape[3] // p, x.shape[4] // p


def _grid_cogvideox(model: torch.nn.Module, kw: dict[str, Any]) -> Grid:
    x = kw["hidden_states"]                                       # [B, F, C, H, W]
    p, pt = int(model.config.patch_size), model.config.patch_size_t
    t = x.shape[1] if pt is None else (x.shape[1] + int(pt) - 1) // int(pt)
    return t, x.shape[3] // p, x.shape[4] // p


LAYOUTS: dict[str, FamilyLayout] = {l.model_class: l for l in (
    FamilyLayout("sd3", "SD3Transformer2DModel",
                 (("transformer_blocks", (("attn", "joint"), ("attn2", "self"))),),
                 "last", "batched",
                 ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                  "block_controlnet_hidden_states"), _grid_image),
    FamilyLayout("flux", "FluxTransformer2DModel",
                 (("transformer_blocks", (("attn", "joint"),)), ("single_transformer_blocks", (("attn", "joint"),))),
                 "first", "sequential",
                 ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance",
                  "controlnet_block_samples", "controlnet_single_block_samples",
                  "joint_attention_kwargs"), _grid_flux),  # its ip_adapter_image_embeds are batch-major
    FamilyLayout("pixart", "PixArtTransformer2DModel",
                 (("transformer_blocks", (("attn1", "self"), ("attn2", "cross"))),),
                 None, "batched",
                 ("hidden_states", "encoder_hidden_states", "timestep", "added_cond_kwargs", "attention_mask",
                  "encoder_attention_mask"), _grid_image),
    FamilyLayout("wan", "WanTransformer3DModel",
                 (("blocks", (("attn1", "self"), ("attn2", "cross"))),),
                 None, "sequential",
                 ("hidden_states", "encoder_hidden_states", "timestep", "encoder_hidden_states_image"), _grid_wan),
    FamilyLayout("hunyuan_video", "HunyuanVideoTransformer3DModel",
                 (("transformer_blocks", (("attn", "joint"),)), ("single_transformer_blocks", (("attn", "joint"),))),
                 "last", "sequential",
                 ("hidden_states", "encoder_hidden_states", "encoder_attention_mask", "pooled_projections",
                  "timestep", "guidance"), _grid_hunyuan),
    FamilyLayout("cogvideox", "CogVideoXTransformer3DModel",
                 (("transformer_blocks", (("attn1", "joint"),)),),
                 "first", "batched",
                 ("hidden_states", "encoder_hidden_states", "timestep", "timestep_cond", "ofs"), _grid_cogvideox),
)}

SUPPORTED = tuple(LAYOUTS)


def known_class(model: Any) -> str | None:
    """The supported class ``model`` is (or derives from), by name; None if none."""
    return next((c.__name__ for c in type(model).__mro__ if c.__name__ in LAYOUTS), None)


def layout_for(model: Any) -> FamilyLayout:
    name = known_class(model)
    if name is None:
        raise UnsupportedModelError(
            f"mmeff's DiT adapter does not support {type(model).__name__}; supported transformers: "
            f"{', '.join(SUPPORTED)} (pass the diffusers pipeline or its .transformer)"
        )
    return LAYOUTS[name]


def find_sites(model: torch.nn.Module, layout: FamilyLayout) -> list[tuple[AttnSite, torch.nn.Module]]:
    """Every attention module named by the layout, with its global layer index, heads and role.

    Attention modules outside the listed blocks (e.g. HunyuanVideo's text token refiner) are not sites.
    """
    sites: list[tuple[AttnSite, torch.nn.Module]] = []
    layer = 0
    for list_name, attrs in layout.blocks:
        blocks = getattr(model, list_name, None)
        if blocks is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no `{list_name}`; this diffusers version "
                                        "is not one mmeff's DiT adapter knows")
        for i, block in enumerate(blocks):
            primary_taken = False
            for attr, role in attrs:
                mod = getattr(block, attr, None)
                if mod is None:
                    continue
                if not hasattr(mod, "processor") or not hasattr(mod, "heads"):
                    raise UnsupportedModelError(f"{list_name}.{i}.{attr} of {type(model).__name__} is not a "
                                                "diffusers attention module with a processor")
                primary = role != "cross" and not primary_taken
                primary_taken = primary_taken or primary
                site = AttnSite(name=f"{list_name}.{i}.{attr}", layer=layer, heads=int(mod.heads), role=role,
                                primary=primary, text_position=layout.text_position if role == "joint" else None)
                sites.append((site, mod))
            layer += 1
    return sites


def spans(seq_len: int, n_image: int, text_position: str | None) -> tuple[tuple[int, int] | None, tuple[int, int]]:
    """(text span, image span) of a sequence of ``seq_len`` tokens holding ``n_image`` latent tokens."""
    n_text = seq_len - n_image
    if text_position is None or n_text <= 0:
        return None, (0, seq_len)
    if text_position == "first":
        return (0, n_text), (n_text, seq_len)
    return (n_image, seq_len), (0, n_image)
