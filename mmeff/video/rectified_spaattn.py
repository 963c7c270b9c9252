"""Rectified SpaAttn (arXiv 2511.19835) as an mmeff DiT attention method.

Video tokens are reordered along a 3-D Hilbert curve so each run of ``block`` tokens is a compact
3-D patch; pooled scores pick critical key blocks (cumulative mass ``tau`` with a floor from
``drop``, 3-D neighbours, text always on, Wan's first frame dense); the sparse output is rescaled
by the estimated kept mass (IPAR) and the pooled contribution of GAPR-eligible dropped blocks is
added back. Dense warm-up steps and layers follow the per-model presets.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, ClassVar

import torch

from ..core.config import MethodConfig, require
from ..core.errors import ConfigError
from ..core.registry import register_method
from ..hosts.dit_context import AttentionRuntime, AttnContext, AttnSite, DiTInfo
from .layout import block_neighbours, gilbert_order, raster_order
from .rectified_core import FLOOR_RULES, rectified_sparse_attention
from .rectified_presets import get_preset
from .site_tokens import reorder, text_valid_lengths, video_grid_ok
from .sparsity_log import SparsityLog

# Which family preset a model gets when ``preset="auto"``.
_FAMILY_PRESET = {"wan": "wan2.1-t2v", "hunyuan_video": "hunyuanvideo", "cogvideox": "cogvideox", "flux": "flux"}


@register_method
@dataclasses.dataclass(frozen=True)
class RectifiedSpaAttn(MethodConfig):
    """Options (None = take it from the model's preset):

    drop: fraction of visual key blocks removed (a floor on kept blocks; tau may keep more); 0 = dense.
    tau: cumulative pooled attention mass that the kept blocks must reach.
    block: tokens per block (128 on GPUs; small values for tiny test models).
    warmup_steps / dense_layers: denoising steps and attention layers that stay dense.
    first_frame_dense: Wan's rule that the first frame's blocks attend densely among themselves.
    ipar / gapr: the two rectification terms (both off = plain block-sparse attention, the ablation).
    order: "gilbert" (3-D Hilbert) or "raster" token order.
    floor: how ``drop`` floors the kept blocks. "visual" (default, mmeff): the ``floor((1 - drop) * n_v)`` largest
        visual blocks are always kept, so drop=0 is dense. "joint" (the official code): the first
        ``max(prefix, int((1 - drop) * n_v))`` entries of the row ranked together with the text column, so with text
        one visual block fewer is kept when text ranks high, drop=0 with text is not dense, and the official float
        truncation applies (179 of 900 blocks at drop 0.8; "visual" rounds robustly to 180).
    Other deliberate differences, no option (docs/video-sparse-attention-variants.md): the token order is mmeff's own
    generalised Hilbert curve, not Jenga's, so blocks hold different tokens; a ragged last block is pooled over its
    true tokens (the official code zero-pads to whole blocks); any batch, text first or last, per-sample text lengths.
    record_masks: keep the latest selected block mask of every layer (sample 0, ``[heads, n_blocks, n_blocks]``
        bools, in block order) for ``report()["block_masks"]``: for sparsity maps of small models; it costs
        heads x n_blocks^2 bytes per layer, so layers with more than ``MAX_RECORDED_BLOCKS`` blocks are skipped.
    """

    name: ClassVar[str] = "rectified_spaattn"
    kind: ClassVar[str] = "dit_attention"

    drop: float | None = None
    tau: float | None = None
    block: int = 128
    warmup_steps: int | None = None
    dense_layers: tuple[int, ...] | None = None
    first_frame_dense: bool | None = None
    ipar: bool = True
    gapr: bool = True
    order: str = "gilbert"
    preset: str = "auto"
    record_masks: bool = False
    floor: str = "visual"

    MAX_RECORDED_BLOCKS: ClassVar[int] = 2048

    def validate(self) -> None:
        require(self.drop is None or 0.0 <= self.drop < 1.0, f"rectified_spaattn: drop must be in [0, 1), got {self.drop}")
        require(self.tau is None or 0.0 <= self.tau <= 1.0, f"rectified_spaattn: tau must be in [0, 1], got {self.tau}")
        require(self.block > 0, f"rectified_spaattn: block must be positive, got {self.block}")
        require(self.warmup_steps is None or self.warmup_steps >= 0, "rectified_spaattn: warmup_steps must be >= 0")
        require(self.order in ("gilbert", "raster"), "rectified_spaattn: order must be 'gilbert' or 'raster'")
        require(self.floor in FLOOR_RULES,
                f"rectified_spaattn: floor must be one of {FLOOR_RULES} ('visual': mmeff's default, drop=0 is dense; "
                f"'joint': the official rule over visual blocks and text together), got {self.floor!r}")
        if self.preset not in ("auto", "none"):
            try:
                get_preset(self.preset)
            except KeyError as exc:
                raise ConfigError(f"rectified_spaattn: {exc.args[0]}") from None

    def resolved(self, family: str) -> dict[str, Any]:
        """Effective settings: explicit options override the model's preset."""
        name = _FAMILY_PRESET.get(family) if self.preset == "auto" else (None if self.preset == "none" else self.preset)
        p = get_preset(name) if name else None
        return {
            "preset": name,
            "drop": self.drop if self.drop is not None else (p.drop if p else 0.8),
            "tau": self.tau if self.tau is not None else (p.tau if p else 0.3),
            "warmup_steps": self.warmup_steps if self.warmup_steps is not None else ((p.warmup_steps or 0) if p else 0),
            "dense_layers": tuple(self.dense_layers) if self.dense_layers is not None else (p.dense_layers if p else ()),
            "first_frame_dense": self.first_frame_dense if self.first_frame_dense is not None
            else (p.first_frame_dense if p else False),
        }

    def make_runtime(self, info: DiTInfo) -> "RectifiedRuntime":
        return RectifiedRuntime(self, info)


class RectifiedRuntime(AttentionRuntime):
    """Per-application state: cached token orders/neighbours, per-layer statistics."""

    def __init__(self, cfg: RectifiedSpaAttn, info: DiTInfo) -> None:
        self.cfg = cfg
        self.info = info
        self.settings = cfg.resolved(info.family)
        self.stats: dict[int, dict[str, float]] = {}
        self.calls = {"sparse": 0, "dense": 0}
        self.seconds = 0.0
        self.log = SparsityLog()
        self.head_kept: dict[int, torch.Tensor] = {}      # layer -> summed per-head kept fraction
        self.block_masks: dict[int, torch.Tensor] = {}    # layer -> latest [H, n_v, n_v] (record_masks only)

    def wants(self, site: AttnSite) -> bool:
        return not site.is_cross

    def _dense(self, ctx: AttnContext) -> bool:
        s = self.settings
        return ((s["drop"] == 0.0 and self.cfg.floor == "visual") or ctx.step < s["warmup_steps"] or ctx.layer in s["dense_layers"]
                or not video_grid_ok(ctx) or ctx.perturbed is not None)

    def __call__(self, ctx: AttnContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 attn_mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
        valid = text_valid_lengths(ctx, attn_mask, q.shape[0])
        if self._dense(ctx) or valid is False:
            self.calls["dense"] += 1
            return ctx.attend(q, k, v, attn_mask, scale)
        t0 = time.perf_counter()
        t, h, w = ctx.grid
        order = gilbert_order(t, h, w) if self.cfg.order == "gilbert" else raster_order(t, h, w)
        r = reorder(ctx, q, k, v, order)
        n_blocks = -(-r.n_video // self.cfg.block)
        ff = min(n_blocks, n_blocks // t) if self.settings["first_frame_dense"] else 0
        neigh = block_neighbours(order, t, h, w, self.cfg.block, device=q.device)
        out, st = rectified_sparse_attention(
            r.q, r.k, r.v, n_visual=r.n_video, text_len=r.n_text, block=self.cfg.block, drop=self.settings["drop"],
            tau=self.settings["tau"], neighbours=neigh, text_valid_len=valid, first_frame_blocks=ff, text_position="last",
            ipar=self.cfg.ipar, gapr=self.cfg.gapr, scale=scale, return_stats=True, floor=self.cfg.floor)
        result = r.restore(out, q)
        layer = self.stats.setdefault(ctx.layer, {"calls": 0, "kept_fraction": 0.0, "rectified_fraction": 0.0})
        layer["calls"] += 1
        layer["kept_fraction"] += float(st.kept_fraction.float().mean())
        layer["rectified_fraction"] += float(st.rectified_fraction.float().mean())
        kept_heads = st.kept_fraction.detach().float().cpu()
        self.head_kept[ctx.layer] = self.head_kept.get(ctx.layer, torch.zeros_like(kept_heads)) + kept_heads
        self.log.add(ctx.step, ctx.layer, 1.0 - float(kept_heads.mean()))
        if self.cfg.record_masks and st.block_mask.shape[-1] <= self.cfg.MAX_RECORDED_BLOCKS:
            self.block_masks[ctx.layer] = st.block_mask[0].detach().cpu().clone()
        self.calls["sparse"] += 1
        self.seconds += time.perf_counter() - t0
        return result

    def report(self) -> dict[str, Any]:
        per_layer = {layer: {"kept_fraction": s["kept_fraction"] / s["calls"],
                             "rectified_fraction": s["rectified_fraction"] / s["calls"], "calls": s["calls"]}
                     for layer, s in sorted(self.stats.items())}
        return {"settings": self.settings, "calls": dict(self.calls), "sparsity_per_layer":
                {k: 1.0 - v["kept_fraction"] for k, v in per_layer.items()}, "per_layer": per_layer,
                "sparsity_per_step_layer": self.log.per_step_layer(),
                "sparsity_per_layer_head": {k: (1.0 - v / self.stats[k]["calls"]).tolist()
                                            for k, v in sorted(self.head_kept.items())},
                "block_masks": dict(sorted(self.block_masks.items())),
                "method_seconds": self.seconds}
