"""Tiny random VLMs of the real classes, built from configs (tests, benchmarks, examples).

Nothing is downloaded. Inputs are hand-built ``input_ids`` with image placeholders, so no tokenizer
is needed. Each builder returns the model in eval mode; ``make_inputs`` builds a (padded) batch.
"""
from __future__ import annotations

from typing import Any

import torch

IMAGE_ID, VIDEO_ID, VSTART_ID, VEND_ID, PAD_ID, EOS_ID = 250, 251, 252, 253, 0, 1
VOCAB = 256


def _text_kwargs(layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2) -> dict[str, Any]:
    return dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=2)


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    return model


def tiny_llava(attn: str = "sdpa", layers: int = 4, seed: int = 0) -> torch.nn.Module:
    """LLaVA-1.5 shape: CLIP ViT (32 px, patch 8 -> 16 tokens), Llama LM."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**_text_kwargs(layers)),
                      image_token_index=IMAGE_ID, vision_feature_layer=-1, projector_hidden_act="gelu")
    return _finish(LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn))


def tiny_llava_next(attn: str = "sdpa", layers: int = 4, seed: int = 0) -> torch.nn.Module:
    """LLaVA-NeXT shape: anyres with 32 px crops (patch 8) and newline tokens."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    cfg = LlavaNextConfig(vision_config=vision, text_config=LlamaConfig(**_text_kwargs(layers)),
                          image_token_index=IMAGE_ID, vision_feature_layer=-1,
                          image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    return _finish(LlavaNextForConditionalGeneration._from_config(cfg, attn_implementation=attn))


def _qwen_text(layers: int) -> dict[str, Any]:
    kw = _text_kwargs(layers)
    kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    return kw


def tiny_qwen2_vl(attn: str = "sdpa", layers: int = 4, seed: int = 0, v25: bool = False) -> torch.nn.Module:
    """Qwen2-VL (or 2.5-VL with ``v25=True``): ViT patch 4, merge 2, temporal patch 2."""
    torch.manual_seed(seed)
    ids = dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VSTART_ID,
               vision_end_token_id=VEND_ID)
    if v25:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration as cls
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, window_size=16,
                      fullatt_block_indexes=[1], in_channels=3)
        cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=_qwen_text(layers), **ids)
    else:
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration as cls
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2, mlp_ratio=2, in_channels=3)
        cfg = Qwen2VLConfig(vision_config=vision, text_config=_qwen_text(layers), **ids)
    return _finish(cls._from_config(cfg, attn_implementation=attn))


def make_inputs(model: torch.nn.Module, prompts: list[tuple[list[int], list[int]]], *, padding: str = "left",
                seed: int = 0, grid: tuple[int, int] = (8, 8), image_px: int = 32,
                image_sizes: list[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
    """A batch of (text-before, text-after) prompts, each with one image between, padded to one length."""
    name = type(model).__name__
    gen = torch.Generator().manual_seed(seed)
    rows, extra = [], {}
    if name.startswith("Qwen"):
        t, h, w = 1, grid[0], grid[1]
        n_img = (h // 2) * (w // 2)
        for before, after in prompts:
            rows.append(before + [VSTART_ID] + [IMAGE_ID] * n_img + [VEND_ID] + after)
        pix = torch.randn(len(prompts) * t * h * w, 3 * 2 * 4 * 4, generator=gen)
        extra["pixel_values"] = pix
        extra["image_grid_thw"] = torch.tensor([[t, h, w]] * len(prompts))
    elif name == "LlavaNextForConditionalGeneration":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches  # noqa: F401

        sizes = image_sizes or [(image_px, image_px)] * len(prompts)
        pvs, counts = [], []
        for hgt, wid in sizes:
            n = _llava_next_tokens(model, hgt, wid)
            counts.append(n)
            patches = _llava_next_patches(model, hgt, wid)
            pvs.append(torch.randn(patches, 3, image_px, image_px, generator=gen))
        maxp = max(p.shape[0] for p in pvs)
        extra["pixel_values"] = torch.stack([torch.cat([p, p.new_zeros(maxp - p.shape[0], *p.shape[1:])]) for p in pvs])
        extra["image_sizes"] = torch.tensor(sizes)
        for (before, after), n in zip(prompts, counts):
            rows.append(before + [IMAGE_ID] * n + after)
    else:
        vc = model.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        extra["pixel_values"] = torch.randn(len(prompts), 3, vc.image_size, vc.image_size, generator=gen)
        for before, after in prompts:
            rows.append(before + [IMAGE_ID] * n + after)
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(length - len(r), length) if padding == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    out = {"input_ids": ids, "attention_mask": mask, **extra}
    if name.startswith("Qwen"):
        out["mm_token_type_ids"] = (ids == IMAGE_ID).to(torch.int)
    return out


def _llava_next_patches(model: torch.nn.Module, height: int, width: int) -> int:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return image_size_to_num_patches((height, width), model.config.image_grid_pinpoints,
                                     model.config.vision_config.image_size)


def _llava_next_tokens(model: torch.nn.Module, height: int, width: int) -> int:
    """Number of placeholder tokens LLaVA-NeXT needs for an image of this original size."""
    with torch.no_grad():
        vc = model.config.vision_config
        n = _llava_next_patches(model, height, width)
        pv = torch.zeros(1, n, 3, vc.image_size, vc.image_size)
        feats = model.model.get_image_features(pixel_values=pv, image_sizes=torch.tensor([[height, width]]),
                                               return_dict=True).pooler_output
        return int(feats[0].shape[0])
