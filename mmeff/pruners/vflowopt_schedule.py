"""VFlowOpt's budget arithmetic: a pre-LLM keep ratio r_v, then LLM cuts keeping r_1, r_2, ... of the rest.

With N visual tokens per image, an L-layer LLM and cuts at layers k_1 < k_2 < ..., the layer-averaged
budget is ``B = N * r_v * (k_1 + (k_2 - k_1) r_1 + (L - k_2) r_1 r_2) / L`` (the paper's BO constraint,
written for any number of cuts). Given all ratios but one, the missing one is solved from B.
"""
from __future__ import annotations

from ..core.errors import BudgetError


def _stage_lengths(layers: tuple[int, ...], n_layers: int) -> list[int]:
    bounds = [0, *layers, n_layers]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def average_budget(n_visual: float, ratio_v: float, ratios: tuple[float, ...], layers: tuple[int, ...],
                   n_layers: int) -> float:
    """Visual tokens per image averaged over the LLM layers."""
    keep, total = ratio_v, 0.0
    for length, r in zip(_stage_lengths(layers, n_layers), (1.0, *ratios)):
        keep *= r
        total += length * keep
    return n_visual * total / n_layers


def solve_last_ratio(budget: float, n_visual: float, ratio_v: float, ratios: tuple[float, ...],
                     layers: tuple[int, ...], n_layers: int) -> float:
    """The last cut's ratio meeting ``budget`` given r_v and the earlier ratios; clipped to <= 1.

    Raises BudgetError when even dropping every token at the last cut exceeds the budget.
    """
    lengths = _stage_lengths(layers, n_layers)
    keep, spent = ratio_v, 0.0
    for length, r in zip(lengths[:-1], (1.0, *ratios)):
        keep *= r
        spent += length * keep
    last = (budget * n_layers / n_visual - spent) / (lengths[-1] * keep) if keep > 0 else 0.0
    if last < -1e-9:
        raise BudgetError(
            f"vflowopt: a budget of {budget:g} tokens cannot be met with ratio_v={ratio_v:g} and ratios {ratios} "
            f"(the stages before the last cut already average {n_visual * spent / n_layers:.1f}); lower ratio_v "
            "or the earlier ratios, or raise the budget"
        )
    return min(1.0, max(0.0, last))


def solve_ratio_v(budget: float, n_visual: float, ratios: tuple[float, ...], layers: tuple[int, ...],
                  n_layers: int) -> float:
    """The pre-LLM ratio meeting ``budget`` with the LLM ratios fixed; clipped to <= 1."""
    per_unit = average_budget(n_visual, 1.0, ratios, layers, n_layers)
    return min(1.0, budget / per_unit) if per_unit > 0 else 1.0
