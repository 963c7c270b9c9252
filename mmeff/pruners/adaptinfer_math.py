"""AdaptInfer's scoring rule and schedules (arXiv 2508.06084; reference: vlm-methods.md section 5).

Numbering: AdaptInfer prunes the *output* of its pruning layer l, scoring with layer l's attention. In mmeff's plan
that is a cut at K = l + 1 scored with layer K - 1 = l, so the released LLaVA-1.5 layers [1, 10, 20] are cuts
(2, 11, 21).
"""
from __future__ import annotations

import math

import torch

from ..core.errors import BudgetError

# The released schedules: LLaVA-1.5-7B (32 layers, 576 tokens) keep counts per budget (paper's "equal token" count),
# Qwen2-VL-2B (28 layers) cumulative keep ratios.
LLAVA_LAYERS, LLAVA_DEPTH, LLAVA_TOKENS = (1, 10, 20), 32, 576
LLAVA_KEEPS = {128: (290, 72, 18), 64: (133, 27, 3), 48: (80, 24, 2), 32: (40, 12, 0)}
QWEN_LAYERS, QWEN_DEPTH, QWEN_RATIOS = (0, 9, 19), 28, (0.17, 0.6, 0.3)


def text_prior_scores(rows_attn: torch.Tensor, text_slots: torch.Tensor, visual_slots: torch.Tensor,
                      lb: float = 1.0) -> torch.Tensor:
    """Score of each visual token from the attention rows of the text tokens after the image.

    rows_attn: [H, R, L] softmax attention of the R text rows (at ``text_slots``) over the L tokens.
    Text-to-text block T = A[:, :, text]; S = T + T^T - diag(T) (optionally mixed toward its mean with ``lb``);
    soft prior w_j = sum_i S_ij per head; score_v = sum_h sum_j w_hj A[h, j, v]. Only R rows exist: no L x L map.
    """
    a = rows_attn.float()
    t2t = a[:, :, text_slots]
    sym = t2t + t2t.transpose(1, 2) - torch.diag_embed(torch.diagonal(t2t, dim1=1, dim2=2))
    if lb != 1.0:
        sym = (1.0 - lb) * sym.mean() + lb * sym
    prior = sym.sum(dim=1)                                       # [H, R]
    return torch.einsum("hr,hrv->v", prior, a[:, :, visual_slots])


def scale_layers(layers: tuple[int, ...], ref_depth: int, n_layers: int, name: str = "adaptinfer") -> tuple[int, ...]:
    """Pruning layers of a ``ref_depth``-layer schedule placed at the same relative depth of an ``n_layers`` LLM.

    Kept strictly increasing and <= n_layers - 2 (the cut after layer l is at l + 1, which must exist).
    """
    if n_layers < len(layers) + 1:
        raise BudgetError(f"{name}: a {len(layers)}-cut schedule needs an LLM of at least {len(layers) + 1} layers, "
                          f"this one has {n_layers}; give fewer layers= ")
    out: list[int] = []
    for layer in layers:
        pos = int(math.floor(layer * n_layers / ref_depth + 0.5))
        out.append(max(pos, out[-1] + 1 if out else 0))
    top = n_layers - 2
    for i in range(len(out) - 1, -1, -1):
        out[i] = min(out[i], top - (len(out) - 1 - i))
    return tuple(out)


def per_layer_counts(n_visual: int, n_layers: int, cuts: tuple[int, ...], keeps: list[int]) -> list[int]:
    """Visual tokens entering each LLM layer for cuts at layers ``cuts`` (0 = before the LLM)."""
    counts = [n_visual] * n_layers
    for layer, k in zip(cuts, keeps):
        counts[layer:] = [k] * (n_layers - layer)
    return counts


def average_budget(counts: list[int], convention: str) -> float:
    """``layer_average``: mean over layers (mmeff's budget); ``equal_token``: the layer before a cut counts its output."""
    if convention == "equal_token":
        counts = counts[1:] + counts[-1:]
    return sum(counts) / len(counts)


def counts_from_shape(shape: tuple[float, ...], alpha: float, n_visual: int) -> list[int]:
    out: list[int] = []
    for c in shape:
        k = min(n_visual, int(math.floor(alpha * c * n_visual + 1e-9)))
        out.append(min(k, out[-1]) if out else k)
    return out


def solve_keeps(shape: tuple[float, ...], budget: float, n_visual: int, n_layers: int, cuts: tuple[int, ...],
                convention: str, name: str = "adaptinfer") -> list[int]:
    """Keep counts ``floor(alpha * shape * n)`` with the largest alpha whose average budget is <= ``budget``."""
    if budget >= n_visual:
        return [n_visual] * len(cuts)
    floor_avg = average_budget(per_layer_counts(n_visual, n_layers, cuts, [0] * len(cuts)), convention)
    if floor_avg > budget + 1e-9:
        raise BudgetError(
            f"{name}: a budget of {budget:g} visual tokens cannot be met with a first cut at layer {cuts[0]} "
            f"({cuts[0]} of {n_layers} layers already see all {n_visual} tokens, i.e. >= {floor_avg:.1f} on average); "
            f"use budget >= {math.ceil(floor_avg + 1e-9)}, earlier layers= or explicit keeps="
        )
    lo, hi = 0.0, 1.0 / max(min(c for c in shape if c > 0), 1e-9) + 1.0
    for _ in range(80):
        mid = (lo + hi) / 2
        avg = average_budget(per_layer_counts(n_visual, n_layers, cuts, counts_from_shape(shape, mid, n_visual)),
                             convention)
        if avg <= budget + 1e-9:
            lo = mid
        else:
            hi = mid
    return counts_from_shape(shape, lo, n_visual)


def cumulative(ratios: tuple[float, ...]) -> tuple[float, ...]:
    out, acc = [], 1.0
    for r in ratios:
        acc *= r
        out.append(acc)
    return tuple(out)


def llava_shape(budget_fraction: float) -> tuple[tuple[float, ...], int]:
    """The published LLaVA-1.5 keep counts (as fractions of 576) closest to this budget fraction, and that budget."""
    paper = min(LLAVA_KEEPS, key=lambda b: (abs(b / LLAVA_TOKENS - budget_fraction), -b))
    return tuple(k / LLAVA_TOKENS for k in LLAVA_KEEPS[paper]), paper
