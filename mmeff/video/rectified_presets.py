"""Rectified SpaAttn defaults per model, as data (from the official scripts; reference §3 table).

Source: ``/work/shared/reference/diffusion-methods.md`` §3 "Defaults per model" and "Step 0",
describing BienLuky/Rectified-SpaAttn @ ``4b0aa10`` (read, not copied). Field meanings:

* ``drop``: fraction of visual key blocks removed; ``floor((1-drop)·n_v)`` is a floor on kept
  blocks and ``tau`` (cumulative pooled mass) can only add more;
* ``dense_layers``: attention-layer ids (the shipped ``processor_id``, counted over the sparse
  modules in model order) that always run dense; for Wan2.2 the ids are *per expert* (the shipped
  code lists {0, 1, 40, 41} over both 40-layer experts);
* ``warmup_steps``: leading denoising **steps** run dense (the shipped code counts processor
  calls; mmeff means pipeline steps). ``None``: not stated in the reference;
* ``first_frame_dense``: Wan's rule ``mask[:F, :F] = True`` with ``F = n_v // T_latent``
  (``first_frame_blocks``); in gilbert order these are the first ``F`` blocks of the curve, not
  literally frame 0;
* ``text_position``: where the text sits in the sequence the sparse call sees. The shipped code
  re-concatenates MM-DiT sequences as ``[visual, text]`` (``"last"``); ``"none"`` = self-attention
  without text (Wan ``attn1``). ``native_text_position`` is diffusers' own order for that model;
* ``text_len``: the padded text length the shipped code assumes (``None``: no text);
* ``teacache``: the TeaCache threshold the scripts use when it is enabled (informative only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from mmeff.core.config import require

__all__ = [
    "PRESETS",
    "RectifiedPreset",
    "first_frame_blocks",
    "get_preset",
    "is_dense",
]


@dataclass(frozen=True)
class RectifiedPreset:
    model: str
    hf_repo: str
    sparse_modules: str  # which attention modules are made sparse
    drop: float
    tau: float = 0.3
    block: int = 128
    dense_layers: tuple[int, ...] = ()
    dense_layers_per_expert: bool = False
    warmup_steps: int | None = 0
    first_frame_dense: bool = False
    text_position: Literal["last", "first", "none"] = "none"
    native_text_position: Literal["last", "first", "none"] = "none"
    text_len: int | None = None
    num_steps: int = 50
    resolution: str = ""
    teacache: float | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        require(0.0 <= self.drop < 1.0, f"{self.model}: drop must be in [0, 1), got {self.drop}")
        require(0.0 <= self.tau <= 1.0, f"{self.model}: tau must be in [0, 1], got {self.tau}")
        require(self.block > 0, f"{self.model}: block must be positive, got {self.block}")
        require(all(i >= 0 for i in self.dense_layers), f"{self.model}: dense layer ids must be >= 0")
        require(self.warmup_steps is None or self.warmup_steps >= 0, f"{self.model}: warmup_steps must be >= 0")
        require(
            (self.text_position == "none") == (self.text_len is None),
            f"{self.model}: text_len must be given exactly when text_position is not 'none'",
        )

    def replace(self, **changes) -> RectifiedPreset:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


_WAN_NOTE = "attn2 (cross-attention) stays dense; Q/K/V padded to a multiple of 128 in the shipped code"

PRESETS: dict[str, RectifiedPreset] = {
    p.model: p
    for p in (
        RectifiedPreset(
            model="hunyuanvideo",
            hf_repo="hunyuanvideo-community/HunyuanVideo",
            sparse_modules="all double- and single-block attentions (token_refiner untouched)",
            drop=0.8,
            warmup_steps=0,
            text_position="last",
            native_text_position="last",
            text_len=256,
            resolution="720x1280, 128 frames (32x45x80 latent = 900 blocks)",
            teacache=0.15,
            notes="no dense warm-up in the shipped code; visual length must be a multiple of 128 there",
        ),
        RectifiedPreset(
            model="wan2.1-t2v-14b",
            hf_repo="Wan-AI/Wan2.1-T2V-14B-Diffusers",
            sparse_modules="attn1",
            drop=0.75,
            dense_layers=(0, 1),
            warmup_steps=5,
            first_frame_dense=True,
            resolution="720x1280, 81 frames, CFG 5.0, UniPC",
            teacache=0.2,
            notes=_WAN_NOTE,
        ),
        RectifiedPreset(
            model="wan2.1-i2v-14b-720p",
            hf_repo="Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
            sparse_modules="attn1",
            drop=0.75,
            dense_layers=(0, 1),
            warmup_steps=0,
            first_frame_dense=True,
            resolution="720x1280, 81 frames",
            teacache=0.3,
            notes=_WAN_NOTE + "; image+text cross-attention dense",
        ),
        RectifiedPreset(
            model="wan2.2-t2v-a14b",
            hf_repo="Wan-AI/Wan2.2-T2V-A14B-Diffusers",
            sparse_modules="attn1",
            drop=0.85,
            dense_layers=(0, 1),
            dense_layers_per_expert=True,
            warmup_steps=3,
            first_frame_dense=True,
            num_steps=40,
            notes="two experts; warm-up of 3 steps is the high-noise expert's; drop 0.75 with TeaCache",
        ),
        RectifiedPreset(
            model="wan2.2-i2v-a14b",
            hf_repo="Wan-AI/Wan2.2-I2V-A14B-Diffusers",
            sparse_modules="attn1",
            drop=0.85,
            dense_layers=(0, 1),
            dense_layers_per_expert=True,
            warmup_steps=None,
            first_frame_dense=True,
            num_steps=40,
            notes="two experts; per-expert warm-up steps not stated in the reference; drop 0.75 with TeaCache",
        ),
        RectifiedPreset(
            model="wan2.2-ti2v-5b",
            hf_repo="Wan-AI/Wan2.2-TI2V-5B-Diffusers",
            sparse_modules="attn1",
            drop=0.75,
            dense_layers=(0, 1),
            warmup_steps=5,
            first_frame_dense=True,
            resolution="704x1280, 121 frames",
            notes="dense layers/steps 'as Wan2.1' per the reference",
        ),
        RectifiedPreset(
            model="flux.1-dev",
            hf_repo="black-forest-labs/FLUX.1-dev",
            sparse_modules="all 57 blocks except processor ids 37..56",
            drop=0.9,
            dense_layers=tuple(range(37, 57)),
            warmup_steps=0,
            text_position="last",
            native_text_position="first",
            text_len=512,
            resolution="4096x4096 upscaling (ControlNet x4 from a 1024^2 base)",
            teacache=0.8,
            notes="the last 20 single blocks stay dense",
        ),
        RectifiedPreset(
            model="cogvideox1.5-5b",
            hf_repo="THUDM/CogVideoX1.5-5B",
            sparse_modules="all",
            drop=0.85,
            warmup_steps=5,
            text_position="last",
            native_text_position="first",
            text_len=226,
            resolution="768x1280, 81 frames, CFG 6.0",
            teacache=0.2,
            notes="T2V; CFG is batched so the 5 dense calls are 5 steps",
        ),
        RectifiedPreset(
            model="cogvideox1.5-5b-i2v",
            hf_repo="THUDM/CogVideoX1.5-5B-I2V",
            sparse_modules="all",
            drop=0.75,
            warmup_steps=5,
            text_position="last",
            native_text_position="first",
            text_len=226,
            resolution="768x1280, 81 frames, CFG 6.0",
            teacache=0.2,
            notes="I2V",
        ),
    )
}

_ALIASES = {
    "hunyuan": "hunyuanvideo",
    "wan2.1-t2v": "wan2.1-t2v-14b",
    "wan2.1-i2v": "wan2.1-i2v-14b-720p",
    "wan2.2-t2v": "wan2.2-t2v-a14b",
    "wan2.2-i2v": "wan2.2-i2v-a14b",
    "wan2.2-ti2v": "wan2.2-ti2v-5b",
    "flux": "flux.1-dev",
    "cogvideox": "cogvideox1.5-5b",
    "cogvideox-i2v": "cogvideox1.5-5b-i2v",
}


def get_preset(model: str) -> RectifiedPreset:
    """The preset for ``model`` (a key of ``PRESETS`` or a short alias such as ``"wan2.1-t2v"``)."""
    key = model.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in PRESETS:
        raise KeyError(f"no Rectified SpaAttn preset for {model!r}; known: {sorted(PRESETS) + sorted(_ALIASES)}")
    return PRESETS[key]


def first_frame_blocks(preset: RectifiedPreset, n_v: int, t_latent: int) -> int:
    """``F`` for the first-frame rule: ``n_v // t_latent`` when the preset uses it, else 0."""
    if not preset.first_frame_dense:
        return 0
    if t_latent <= 0:
        raise ValueError(f"t_latent must be positive, got {t_latent}")
    return min(n_v, n_v // t_latent)


def is_dense(preset: RectifiedPreset, layer: int, step: int, layers_per_expert: int | None = None) -> bool:
    """Whether attention layer ``layer`` runs dense at denoising step ``step`` (0-based).

    For presets with ``dense_layers_per_expert``, pass ``layers_per_expert`` when ``layer`` is
    a global id over several experts (it is reduced modulo that count).
    """
    lid = layer % layers_per_expert if (preset.dense_layers_per_expert and layers_per_expert) else layer
    warm = preset.warmup_steps or 0
    return lid in preset.dense_layers or step < warm
