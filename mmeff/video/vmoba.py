"""VMoBA (arXiv 2506.23858) as an mmeff DiT attention method, training-free inference.

Each layer partitions the video tokens into chunks whose shape cycles 1-D (frames), 2-D (spatial
tiles over all frames), 3-D (cubes) across depth; every query attends to its own chunk and to the
chunks its gate (q . mean key) routes it to (cumulative-share threshold or top-k), merged by
log-sum-exp. Text tokens of joint-attention models [recon]: the text keys form one extra chunk that
visual queries may route to like any other, and text queries attend densely to everything.
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
from .site_tokens import reorder, text_valid_lengths, video_grid_ok
from .sparsity_log import SparsityLog
from .vmoba_core import BUDGET_SCOPES, vmoba_attention
from .vmoba_partition import layer_chunk, partition_order
from .vmoba_presets import get_preset


def _chunk(spec: str) -> int | tuple[int, ...]:
    parts = tuple(int(x) for x in spec.replace("x", ",").split(",") if x.strip())
    return parts[0] if len(parts) == 1 else parts


@register_method
@dataclasses.dataclass(frozen=True)
class VMoBA(MethodConfig):
    """Options: chunk shapes as "2" (frames), "3x4" (spatial tile), "4x6x4" (cube); mode "threshold"|"topk";
    threshold = share of normalised cumulative gate similarity; topk per layer kind; a preset fills unset fields
    (e.g. preset="wan2.1-1.3b-480p").

    budget_scope: "sample" (default) decides ``threshold_type="head_global"`` and the dense fallback per
    sample, so a batch gives each sample's own output; "batch" reproduces the official packed varlen call,
    where head_global normalises, ranks and budgets jointly over the batch (the fallback then needs the
    whole batch to route nothing).

    Routing follows the official code: threshold rows always keep the best other chunk, tau >= 1 keeps every chunk
    (its 1e-6 guard), and a layer call that routes nothing beyond the own chunks (topk = 1) is dense attention.
    Deliberate differences (docs/video-sparse-attention-variants.md): text keys of joint-attention models form one
    extra chunk (official VMoBA has no text handling); ties at a normalised gate of 0 rank by chunk index (the
    official sort leaves them unspecified); budget_scope above."""

    name: ClassVar[str] = "vmoba"
    kind: ClassVar[str] = "dit_attention"

    temporal_chunk: str | None = None
    spatial_chunk: str | None = None
    st_chunk: str | None = None
    mode: str | None = None
    threshold: float | None = None
    topk: tuple[int, ...] | None = None
    threshold_type: str | None = None
    first_full_layer: int | None = None
    warmup_steps: int = 0
    preset: str | None = None
    budget_scope: str = "sample"

    def __post_init__(self) -> None:
        if self.topk is not None and len(self.topk) == 1:  # topk=2: the same top-k for every layer kind
            object.__setattr__(self, "topk", tuple(self.topk) * 3)
        super().__post_init__()

    def validate(self) -> None:
        require(self.mode in (None, "threshold", "topk"), f"vmoba: mode must be 'threshold' or 'topk', got {self.mode!r}")
        require(self.threshold is None or self.threshold > 0, "vmoba: threshold must be > 0")
        require(self.threshold_type in (None, "query_head", "head_global"),
                "vmoba: threshold_type must be 'query_head' or 'head_global'")
        require(self.budget_scope in BUDGET_SCOPES,
                f"vmoba: budget_scope must be one of {BUDGET_SCOPES} ('sample': batch == single, the default; "
                f"'batch': the official packed batch), got {self.budget_scope!r}")
        require(self.topk is None or len(self.topk) == 3, "vmoba: topk takes 1 value (every layer kind) or 3 (temporal;spatial;3d), e.g. 3;20;15")
        if self.preset is not None:
            try:
                get_preset(self.preset)
            except ValueError as exc:
                raise ConfigError(f"vmoba: {exc}") from None
        elif None in (self.temporal_chunk, self.spatial_chunk, self.st_chunk):
            raise ConfigError("vmoba: give a preset (e.g. preset=wan2.1-1.3b-480p) or all three chunk shapes "
                              "(temporal_chunk=2, spatial_chunk=3x4, st_chunk=4x6x4)")

    def resolved(self) -> dict[str, Any]:
        p = get_preset(self.preset) if self.preset else None
        return {
            "chunks": (_chunk(self.temporal_chunk) if self.temporal_chunk else p.temporal_chunk,
                       _chunk(self.spatial_chunk) if self.spatial_chunk else p.spatial_chunk,
                       _chunk(self.st_chunk) if self.st_chunk else p.st_chunk),
            "topk": tuple(self.topk) if self.topk else (p.temporal_topk, p.spatial_topk, p.st_topk) if p else (3, 3, 3),
            "mode": self.mode or (p.mode if p else "threshold"),
            "threshold": self.threshold if self.threshold is not None else (p.threshold if p else 0.25),
            "threshold_type": self.threshold_type or (p.threshold_type if p else "query_head"),
            "first_full_layer": self.first_full_layer if self.first_full_layer is not None
            else (p.first_full_layer if p else 0),
            "warmup_steps": self.warmup_steps,
            "budget_scope": self.budget_scope,
        }

    def make_runtime(self, info: DiTInfo) -> "VMoBARuntime":
        return VMoBARuntime(self, info)


class VMoBARuntime(AttentionRuntime):
    def __init__(self, cfg: VMoBA, info: DiTInfo) -> None:
        self.settings = cfg.resolved()
        self.stats: dict[int, dict[str, float]] = {}
        self.calls = {"sparse": 0, "dense": 0}
        self.seconds = 0.0
        self.log = SparsityLog()

    def wants(self, site: AttnSite) -> bool:
        return not site.is_cross

    def __call__(self, ctx: AttnContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 attn_mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
        s = self.settings
        chunk = layer_chunk(ctx.layer, s["first_full_layer"], 1, 1, 1, s["chunks"])
        valid = text_valid_lengths(ctx, attn_mask, q.shape[0])
        if (chunk is None or ctx.step < s["warmup_steps"] or valid is False or not video_grid_ok(ctx)
                or ctx.perturbed is not None):
            self.calls["dense"] += 1
            return ctx.attend(q, k, v, attn_mask, scale)
        t0 = time.perf_counter()
        t, h, w = ctx.grid
        perm, ids, n_chunks = partition_order(t, h, w, chunk)
        kind = 0 if isinstance(chunk, int) else (1 if len(chunk) == 2 else 2)
        n_text = 0 if ctx.text is None else ctx.text[1] - ctx.text[0]
        if valid is None or bool((valid == n_text).all()):
            result, sparsity = self._sparse(ctx, q, k, v, perm, ids, n_chunks, kind, scale, n_text)
        else:  # padded text (HunyuanVideo): each sample attends only to its valid text keys
            if s["budget_scope"] == "batch" and q.shape[0] > 1:
                raise ConfigError("vmoba: budget_scope='batch' packs the batch into one routing call, which needs "
                                  "the same text length in every sample; this batch has padded text of "
                                  f"different lengths {valid.tolist()}. Use budget_scope='sample' or batch 1")
            result = ctx.attend(q, k, v, attn_mask, scale).clone()  # padded text rows keep their dense output
            sparsity = 0.0
            for b in range(q.shape[0]):
                n_valid = int(valid[b])
                sub = dataclasses.replace(ctx, text=(ctx.text[0], ctx.text[0] + n_valid))
                out_b, sp = self._sparse(sub, q[b:b + 1], k[b:b + 1], v[b:b + 1], perm, ids, n_chunks, kind, scale,
                                         n_valid, full_like=q[b:b + 1])
                s0, s1 = ctx.image
                result[b:b + 1, :, s0:s1] = out_b[:, :, s0:s1]
                result[b:b + 1, :, ctx.text[0]:ctx.text[0] + n_valid] = out_b[:, :, ctx.text[0]:ctx.text[0] + n_valid]
                sparsity += sp / q.shape[0]
        rec = self.stats.setdefault(ctx.layer, {"calls": 0, "sparsity": 0.0, "chunks": float(n_chunks)})
        rec["calls"] += 1
        rec["sparsity"] += sparsity
        self.log.add(ctx.step, ctx.layer, sparsity)
        self.calls["sparse"] += 1
        self.seconds += time.perf_counter() - t0
        return result

    def _sparse(self, ctx: AttnContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, perm: torch.Tensor,
                ids: torch.Tensor, n_chunks: int, kind: int, scale: float | None, n_text: int,
                full_like: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """VMoBA over the video chunks (+ the text keys as one more chunk); text queries attend densely."""
        s = self.settings
        r = reorder(ctx, q, k, v, perm)
        if n_text:
            ids = torch.cat([ids, torch.full((n_text,), n_chunks, dtype=ids.dtype)])
        total = n_chunks + (1 if n_text else 0)
        out, st = vmoba_attention(r.q, r.k, r.v, chunk_ids=ids.to(q.device), mode=s["mode"], threshold=s["threshold"],
                                  topk=min(s["topk"][kind] + (1 if n_text else 0), total),
                                  threshold_type=s["threshold_type"], budget_scope=s["budget_scope"], scale=scale,
                                  return_stats=True)
        if n_text:
            dense_text = torch.nn.functional.scaled_dot_product_attention(r.q[:, :, r.n_video:], r.k, r.v, scale=scale)
            out = torch.cat([out[:, :, :r.n_video], dense_text], dim=2)
        return r.restore(out, full_like if full_like is not None else q), float(st["sparsity"])

    def report(self) -> dict[str, Any]:
        return {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.settings.items()},
                "calls": dict(self.calls), "method_seconds": self.seconds,
                "sparsity_per_layer": {k: v["sparsity"] / v["calls"] for k, v in sorted(self.stats.items())},
                "sparsity_per_step_layer": self.log.per_step_layer()}
