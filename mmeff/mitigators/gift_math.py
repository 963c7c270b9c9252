"""GIFT's two rules as plain tensor functions (reference §7), shared by the hooks and checked by oracle tests.

Saliency (prefill, one sample, one layer): ``attn`` holds the attention rows of the token just before the
question and of every question token, over the visual columns: ``[H, R+1, V]``.
``ΔA_{h,i,v} = max(A_{h,i,v} - A_{h,i-1,v}, 0)`` for the question rows; only informative rows count
(all rows when none is informative); per layer the top ``H // 2`` heads by total shift are kept;
``s_v`` = the mean of ΔA over those heads and rows (and over saliency layers), clipped to ``mean ± 3 std``
(population std) and min-max normalised; the visual weights are ``w_v = exp(alpha * s_v)``.

Enhancement (every row that predicts a generated token, each enhancement layer): from that row's attention
probabilities ``p [H, K]``, the vision-heavy heads ``H_V`` (top ``H // 2`` by visual mass) get their visual
columns multiplied by ``w``; ``r = Σ_{H_V,v} p w / Σ_{H_V,v} p``; the text-heavy heads ``H_T`` (top ``H // 2``
by question mass) get their question columns multiplied by ``r``; rows are renormalised. Multiplying and
renormalising equals adding ``log w`` / ``log r`` to the logits, which is how it reaches SDPA: as an additive
float mask (:func:`enhancement_bias`).
"""
from __future__ import annotations

import torch


def gaze_shift(attn: torch.Tensor, informative: torch.Tensor) -> torch.Tensor:
    """``[H, R', V]`` positive attention increase of the informative question rows (all rows if none)."""
    shift = (attn[:, 1:] - attn[:, :-1]).clamp_min(0)
    keep = informative if bool(informative.any()) else torch.ones_like(informative)
    return shift[:, keep]


def layer_saliency(shift: torch.Tensor) -> torch.Tensor:
    """``[V]`` mean shift over the top ``H // 2`` heads (by total shift) and the rows of one layer."""
    n_heads = shift.shape[0]
    top = shift.sum((1, 2)).topk(max(1, n_heads // 2)).indices
    return shift[top].mean((0, 1))


def visual_weights(saliency: torch.Tensor, alpha: float) -> torch.Tensor:
    """``[V]`` weights ``exp(alpha * s)`` of a saliency map, clipped to mean ± 3 std and min-max normalised."""
    mu, sd = saliency.mean(), saliency.std(unbiased=False)
    s = saliency.clamp(mu - 3 * sd, mu + 3 * sd)
    span = s.max() - s.min()
    s = (s - s.min()) / span if float(span) > 0 else torch.zeros_like(s)
    return torch.exp(alpha * s)


def column_table(log_w: torch.Tensor, visual: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``[B, K, 3]``: per key column the visual flag, the question flag and ``w`` on the visual columns (0 elsewhere).

    GIFT's per-column constants, built once per prompt and layer, so one matmul gives every row's visual mass,
    question mass and weighted visual mass."""
    visf = visual.to(log_w.dtype)
    return torch.stack([visf, query.to(log_w.dtype), log_w.exp() * visf], -1)


def enhancement_bias(probs: torch.Tensor, log_w: torch.Tensor, visual: torch.Tensor | None, query: torch.Tensor,
                     table: torch.Tensor | None = None) -> torch.Tensor:
    """Additive logit bias ``[B, H, R, K]`` for attention rows ``probs [B, H, R, K]``.

    ``log_w [B, K]``: log visual weight per key column (0 off the visual columns); ``visual`` / ``query``
    ``[B, K]`` bool: the image's and the question's columns; ``table``: :func:`column_table` of them when already
    built (then ``visual`` is not read). Equal to GIFT's multiply-and-renormalise rule after the softmax.
    """
    n_heads = probs.shape[1]
    k = max(1, n_heads // 2)
    if table is None:
        table = column_table(log_w, visual, query)
    mass = probs @ table[:, None].to(probs.dtype)                                 # [B, H, R, 3]: visual, question, w-visual
    heavy_v = _top_heads(mass[..., 0], k)                                         # [B, H, R] bool
    sums = (mass * heavy_v[..., None]).sum(1)                                     # [B, R, 3]: sums over H_V and v
    den = sums[..., 0]
    r = torch.where(den > 0, sums[..., 2] / den, 1.0)                            # no visual mass: r = 1
    heavy_t = _top_heads(mass[..., 1], k)
    bias = heavy_v[..., None] * log_w[:, None, None, :]
    return bias + (heavy_t[..., None] * query[:, None, None, :]) * r.log()[:, None, :, None]


def _top_heads(mass: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, H, R]`` bool: the ``k`` heads with the largest mass per (sample, row)."""
    idx = mass.topk(k, dim=1).indices
    return torch.zeros_like(mass, dtype=torch.bool).scatter(1, idx, True)
