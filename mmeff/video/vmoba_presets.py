"""VMoBA presets: chunk shapes, top-k and selection per model and resolution.

``WAN21_1_3B_480P`` and ``WAN21_1_3B_448P_TOPK`` are FastVideo's shipped configs for
Wan2.1-T2V-1.3B at 77 frames (``wan_1.3B_77_480_832.json``, ``wan_1.3B_77_448_832.json``;
reference §4 "Defaults per model"). ``WAN21_14B_720P`` is an mmeff analogue for the 14B model
at 720x1280, 81 frames (latent 21 x 45 x 80 = 75 600 tokens) and is **[recon]**: no published
VMoBA config exists for it. Its chunk shapes keep the 1.3B configs' proportions where the
grid allows:

- temporal: 3 frames per chunk -> 7 chunks of 10 800 tokens (21 has no factor 2; the 1.3B
  config uses 10 chunks), topk 2 (29% of chunks; 1.3B: 3 of 10);
- spatial: (5, 8) tiles -> 9 x 10 = 90 chunks of 840 tokens, each tile about 1/9 x 1/10 of
  the frame (1.3B: (3, 4) on 30 x 52, about 1/10 x 1/13), topk 14 (16%; 1.3B: 20 of 130);
- 3-D: (3, 9, 8) cubes -> 7 x 5 x 10 = 350 chunks of 216 tokens, topk 16 (4.6%; 1.3B:
  15 of 325). Finer cubes (e.g. (3, 5, 8), 630 chunks) would make the ``[B, H, S, n_chunks]``
  gate and selection tensors large (40 heads x 75 600 tokens).

Like the 1.3B 480p config it selects by threshold (τ = 0.25, ``query_head``); the top-k
values are used when ``mode="topk"``. Untested on the real model.

The latent grid follows Wan's VAE (4x temporal with the first frame kept, 8x spatial) and
patch size (1, 2, 2): ``T = (frames - 1) // 4 + 1``, ``H = height // 16``, ``W = width // 16``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .vmoba_core import MODES, THRESHOLD_TYPES
from .vmoba_partition import Chunk, layer_kind, partition_order

__all__ = [
    "PRESETS",
    "WAN21_1_3B_448P_TOPK",
    "WAN21_1_3B_480P",
    "WAN21_14B_720P",
    "TINY_WAN",
    "VMoBALayerParams",
    "VMoBAPreset",
    "get_preset",
    "wan_latent_grid",
]


def wan_latent_grid(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Wan 2.1 latent token grid ``(T, H, W)`` for a video of ``frames x height x width`` pixels."""
    if (frames - 1) % 4 or height % 16 or width % 16:
        raise ValueError(
            f"Wan needs frames = 4n + 1 and height/width multiples of 16, got {frames} x {height} x {width}"
        )
    return (frames - 1) // 4 + 1, height // 16, width // 16


@dataclass(frozen=True)
class VMoBALayerParams:
    """What one sparse layer runs: its chunk spec, kind and top-k."""

    kind: str
    chunk: Chunk
    topk: int


@dataclass(frozen=True)
class VMoBAPreset:
    """A VMoBA setting for one model/resolution. Validated on creation (``ValueError``)."""

    name: str
    latent_grid: tuple[int, int, int]
    temporal_chunk: int
    temporal_topk: int
    spatial_chunk: tuple[int, int]
    spatial_topk: int
    st_chunk: tuple[int, int, int]
    st_topk: int
    mode: str = "threshold"
    threshold: float = 0.25
    threshold_type: str = "query_head"
    first_full_layer: int = 0
    first_full_step: int = 0
    temporal_layers: int = 1
    spatial_layers: int = 1
    st_layers: int = 1
    source: str = ""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"{self.name}: mode must be one of {MODES}, got {self.mode!r}")
        if self.threshold_type not in THRESHOLD_TYPES:
            raise ValueError(f"{self.name}: threshold_type must be one of {THRESHOLD_TYPES}, got {self.threshold_type!r}")
        for kind, chunk, topk in self._kinds():
            _, _, n_chunks = partition_order(*self.latent_grid, chunk)  # raises on non-divisible sizes
            if not 1 <= topk <= n_chunks:
                raise ValueError(f"{self.name}: {kind} topk must be in [1, {n_chunks}] (its chunk count), got {topk}")
        layer_kind(self.first_full_layer, self.first_full_layer, self.temporal_layers, self.spatial_layers, self.st_layers)

    def _kinds(self) -> tuple[tuple[str, Chunk, int], ...]:
        return (
            ("temporal", self.temporal_chunk, self.temporal_topk),
            ("spatial", self.spatial_chunk, self.spatial_topk),
            ("spatiotemporal", self.st_chunk, self.st_topk),
        )

    @property
    def seq_len(self) -> int:
        t, h, w = self.latent_grid
        return t * h * w

    def for_layer(self, layer_idx: int) -> VMoBALayerParams | None:
        """Chunk spec and top-k of one transformer block; ``None`` for a dense layer."""
        kind = layer_kind(layer_idx, self.first_full_layer, self.temporal_layers, self.spatial_layers, self.st_layers)
        for name, chunk, topk in self._kinds():
            if name == kind:
                return VMoBALayerParams(kind, chunk, topk)
        return None

    def attention_kwargs(self, layer_idx: int) -> dict | None:
        """Keyword arguments for ``vmoba_attention`` at this layer (add ``chunk_ids`` from
        ``partition_order(*latent_grid, params.chunk)``); ``None`` for a dense layer."""
        params = self.for_layer(layer_idx)
        if params is None:
            return None
        return {"mode": self.mode, "threshold": self.threshold, "topk": params.topk, "threshold_type": self.threshold_type}

    def chunk_counts(self) -> dict[str, tuple[int, int]]:
        """``{kind: (n_chunks, tokens per chunk)}`` for the preset's grid."""
        out = {}
        for kind, chunk, _ in self._kinds():
            _, ids, n = partition_order(*self.latent_grid, chunk)
            out[kind] = (n, int((ids == 0).sum()))
        return out

    def replace(self, **changes) -> VMoBAPreset:
        return dataclasses.replace(self, **changes)


WAN21_1_3B_480P = VMoBAPreset(
    name="wan2.1-1.3b-480p",
    latent_grid=wan_latent_grid(77, 480, 832),  # (20, 30, 52)
    temporal_chunk=2, temporal_topk=3,          # 10 chunks of 3 120 tokens
    spatial_chunk=(3, 4), spatial_topk=20,      # 130 chunks of 240
    st_chunk=(4, 6, 4), st_topk=15,             # 325 chunks of 96
    mode="threshold", threshold=0.25, threshold_type="query_head",
    first_full_layer=0, first_full_step=12,     # first_full_step: FastVideo metadata, unused there
    source="FastVideo configs/backend/vmoba/wan_1.3B_77_480_832.json [code]",
)

WAN21_1_3B_448P_TOPK = VMoBAPreset(
    name="wan2.1-1.3b-448p-topk",
    latent_grid=wan_latent_grid(77, 448, 832),  # (20, 28, 52)
    temporal_chunk=2, temporal_topk=2,          # 10 chunks of 2 912 tokens
    spatial_chunk=(4, 13), spatial_topk=6,      # 28 chunks of 1 040
    st_chunk=(4, 4, 13), st_topk=18,            # 140 chunks of 208
    mode="topk",
    source="FastVideo configs/backend/vmoba/wan_1.3B_77_448_832.json [code]",
)

WAN21_14B_720P = VMoBAPreset(
    name="wan2.1-14b-720p",
    latent_grid=wan_latent_grid(81, 720, 1280),  # (21, 45, 80)
    temporal_chunk=3, temporal_topk=2,           # 7 chunks of 10 800 tokens
    spatial_chunk=(5, 8), spatial_topk=14,       # 90 chunks of 840
    st_chunk=(3, 9, 8), st_topk=16,              # 350 chunks of 216
    mode="threshold", threshold=0.25, threshold_type="query_head",
    source="[recon] mmeff analogue of the 1.3B 480p config; not published, not validated",
)

TINY_WAN = VMoBAPreset(
    name="tiny-wan",
    latent_grid=(4, 8, 8),                       # mmeff's shipped tiny-wan: 13 frames at 64 x 64 px
    temporal_chunk=1, temporal_topk=2,           # 4 chunks of 64 tokens
    spatial_chunk=(4, 4), spatial_topk=2,        # 4 chunks of 64
    st_chunk=(2, 4, 4), st_topk=3,               # 8 chunks of 32
    mode="topk", first_full_layer=1,
    source="mmeff's tiny-wan (the demo's default and the vmoba_k2 row of mmeff.eval.video_fidelity)",
)

PRESETS: dict[str, VMoBAPreset] = {
    p.name: p for p in (WAN21_1_3B_480P, WAN21_1_3B_448P_TOPK, WAN21_14B_720P, TINY_WAN)
}


def get_preset(name: str) -> VMoBAPreset:
    """A preset by name; ``ValueError`` listing the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown VMoBA preset {name!r}; known presets: {sorted(PRESETS)}") from None
