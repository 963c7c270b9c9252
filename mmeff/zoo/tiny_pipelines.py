"""Tiny random diffusers pipelines and DiT transformers, built from configs (tests, examples).

Nothing is downloaded: tokenizers come from in-memory vocabularies, every model from a config with
a fixed seed, in eval mode. Sizes are the smallest that exercise the real code paths (joint text +
image attention, FLUX single blocks, QK-norm, 3-D video grids) and run a 2-step generation on a CPU in
a few hundredths of a second. ``call_kwargs(family)`` gives deterministic, silent call arguments.
"""
from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

import torch

FAMILIES = ("sd3", "sd3_qknorm", "flux", "pixart", "wan", "cogvideox")
TRANSFORMER_FAMILIES = FAMILIES + ("hunyuan_video",)


# ---------------------------------------------------------------------------------------------- text
def clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer() -> Any:
    from transformers import T5Tokenizer

    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
             + [(c, -3.0) for c in string.ascii_lowercase]
             + [("\u2581" + c, -3.0) for c in string.ascii_lowercase])
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def clip_text(projection: bool = True, seed: int = 0) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=1000, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                         max_position_embeddings=77)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(cfg).eval()


def t5_text(seed: int = 0, umt5: bool = False) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    kw = {"d_model": 32, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4, "vocab_size": 1000,
          "relative_attention_num_buckets": 8}
    if umt5:
        return UMT5EncoderModel(UMT5Config(**kw)).eval()
    return T5EncoderModel(T5Config(**kw)).eval()


def image_vae(latent_channels: int = 4, seed: int = 0) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(4,), layers_per_block=1, latent_channels=latent_channels,
                         norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                         scaling_factor=1.0, shift_factor=0.0).eval()


# ---------------------------------------------------------------------------------------------- transformers
def sd3_transformer(qk_norm: str | None = None, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """SD3 MM-DiT: joint attention, image first / text last; 4 heads x 8."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=layers,
                                  attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                  joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
                                  qk_norm=qk_norm).eval()
    if qk_norm is not None:  # make the norm matter (random init leaves it at identity weights)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".norm_q." in name or ".norm_k." in name or "norm_added_q" in name or "norm_added_k" in name:
                    p.mul_(3.0)
    return model


def flux_transformer(seed: int = 0) -> torch.nn.Module:
    """FLUX: 1 double (joint) + 1 single block, text first; 2 heads x 16."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()


def pixart_transformer(seed: int = 0) -> torch.nn.Module:
    """PixArt-alpha: self-attention attn1 (image only) + cross-attention attn2; 3 heads x 8."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                    num_attention_heads=3, caption_channels=32, in_channels=4,
                                    cross_attention_dim=24, out_channels=8, attention_bias=True,
                                    activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                    norm_type="ada_norm_single", norm_elementwise_affine=False,
                                    norm_eps=1e-6).eval()


def wan_transformer(seed: int = 0) -> torch.nn.Module:
    """Wan 2.1: self-attention attn1 (video tokens, RoPE) + cross-attention attn2; 2 heads x 12."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                 num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32).eval()


def hunyuan_video_transformer(seed: int = 0) -> torch.nn.Module:
    """HunyuanVideo: 1 double + 1 single block (image first / text last), a text token refiner; 2 heads x 8."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                          attention_head_dim=8, num_layers=1, num_single_layers=1,
                                          num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                          guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
                                          rope_axes_dim=(2, 4, 2)).eval()


def cogvideox_transformer(seed: int = 0) -> torch.nn.Module:
    """CogVideoX: joint attention with text first; 2 heads x 8, 2 layers."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                       out_channels=4, time_embed_dim=4, text_embed_dim=32, num_layers=2,
                                       sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
                                       temporal_compression_ratio=4, max_text_seq_length=16).eval()


# ---------------------------------------------------------------------------------------------- pipelines
def sd3_pipeline(qk_norm: str | None = None, seed: int = 0) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return _quiet(StableDiffusion3Pipeline(
        transformer=sd3_transformer(qk_norm, seed=seed), scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=image_vae(4, seed), text_encoder=clip_text(True, seed), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text(True, seed + 1), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_text(seed), tokenizer_3=t5_tokenizer()))


def flux_pipeline(seed: int = 0) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return _quiet(FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=image_vae(1, seed), text_encoder=clip_text(False, seed),
        tokenizer=clip_tokenizer(), text_encoder_2=t5_text(seed), tokenizer_2=t5_tokenizer(),
        transformer=flux_transformer(seed)))


def pixart_pipeline(seed: int = 0) -> Any:
    from diffusers import DDIMScheduler, PixArtAlphaPipeline

    return _quiet(PixArtAlphaPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_text(seed),
                                      vae=image_vae(4, seed), transformer=pixart_transformer(seed),
                                      scheduler=DDIMScheduler()))


def wan_pipeline(seed: int = 0) -> Any:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    return _quiet(WanPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_text(seed, umt5=True), vae=vae,
                              scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                              transformer=wan_transformer(seed)))


def cogvideox_pipeline(seed: int = 0) -> Any:
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
    )

    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, latent_channels=4,
                                 down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4,
                                 block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4).eval()
    return _quiet(CogVideoXPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_text(seed), vae=vae,
                                    transformer=cogvideox_transformer(seed), scheduler=CogVideoXDDIMScheduler()))


BUILDERS: dict[str, Callable[[], Any]] = {
    "sd3": lambda: sd3_pipeline(None),
    "sd3_qknorm": lambda: sd3_pipeline("rms_norm"),
    "flux": flux_pipeline,
    "pixart": pixart_pipeline,
    "wan": wan_pipeline,
    "cogvideox": cogvideox_pipeline,
}

TRANSFORMER_BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    "sd3": lambda: sd3_transformer(None),
    "sd3_qknorm": lambda: sd3_transformer("rms_norm"),
    "flux": flux_transformer,
    "pixart": pixart_transformer,
    "wan": wan_transformer,
    "hunyuan_video": hunyuan_video_transformer,
    "cogvideox": cogvideox_transformer,
}


def tiny_pipeline(family: str) -> Any:
    """A tiny pipeline of ``family`` (one of :data:`FAMILIES`)."""
    return BUILDERS[family]()


def tiny_transformer(family: str) -> torch.nn.Module:
    """A tiny transformer of ``family`` (one of :data:`TRANSFORMER_FAMILIES`)."""
    return TRANSFORMER_BUILDERS[family]()


def call_kwargs(family: str, seed: int = 0, steps: int = 2, cfg: float | None = None, **extra: Any) -> dict[str, Any]:
    """Deterministic call arguments for ``tiny_pipeline(family)(**call_kwargs(family))``.

    ``cfg`` is the pipeline's classifier-free guidance scale (None: the family's test default, CFG on);
    FLUX uses true CFG (``true_cfg_scale`` with a negative prompt) since its ``guidance_scale`` is distilled.
    """
    kw: dict[str, Any] = {"prompt": "a red cube", "num_inference_steps": steps,
                          "generator": torch.Generator().manual_seed(seed), "output_type": "np"}
    s = 3.0 if cfg is None else cfg
    if family in ("sd3", "sd3_qknorm"):
        kw.update(height=16, width=16, guidance_scale=s, negative_prompt="blur", max_sequence_length=16)
    elif family == "flux":
        kw.update(height=16, width=16, max_sequence_length=16, true_cfg_scale=s, negative_prompt="blur")
    elif family == "pixart":
        kw.update(height=16, width=16, guidance_scale=s, negative_prompt="blur", use_resolution_binning=False,
                  clean_caption=False, max_sequence_length=16)
    elif family == "wan":
        kw.update(height=32, width=32, num_frames=5, guidance_scale=s, negative_prompt="blur",
                  max_sequence_length=16, output_type="latent")
    elif family == "cogvideox":
        kw.update(height=32, width=32, num_frames=5, guidance_scale=s, negative_prompt="blur",
                  max_sequence_length=16, output_type="latent", use_dynamic_cfg=False)
    else:
        raise KeyError(f"unknown tiny family {family!r}; choose from {FAMILIES}")
    kw.update(extra)
    return kw


def image_of(out: Any) -> torch.Tensor:
    """The image/video/latent array of a pipeline output, as a float tensor."""
    for name in ("images", "frames"):
        val = getattr(out, name, None)
        if val is not None:
            return torch.as_tensor(val).float() if not isinstance(val, torch.Tensor) else val.float()
    return torch.as_tensor(out[0]).float()


def _quiet(pipe: Any) -> Any:
    pipe.set_progress_bar_config(disable=True)
    return pipe


CACHES = ("pab", "faster", "first_block")


def diffusers_cache(name: str, pipe: Any) -> Any:
    """A diffusers cache config for ``pipe.transformer.enable_cache`` that acts on every step of a tiny run.

    ``"pab"``: Pyramid Attention Broadcast, ``"faster"``: FasterCache (batched-CFG pipelines), ``"first_block"``:
    First Block Cache. Timestep ranges cover the whole schedule so the caches really skip work in 2-3 steps.
    """
    from diffusers import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        PyramidAttentionBroadcastConfig,
    )

    if name == "pab":
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                               spatial_attention_timestep_skip_range=(-1, 1001),
                                               current_timestep_callback=lambda: pipe.current_timestep)
    if name == "faster":
        return FasterCacheConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
                                 current_timestep_callback=lambda: pipe.current_timestep,
                                 attention_weight_callback=lambda _: 0.5, is_guidance_distilled=False)
    if name == "first_block":
        return FirstBlockCacheConfig(threshold=0.5)
    raise KeyError(f"unknown cache {name!r}; choose from {CACHES}")
