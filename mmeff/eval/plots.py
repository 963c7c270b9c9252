"""Evaluation figures (matplotlib, Agg backend): the retention-vs-budget plot and the shared save step."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any


def plot_retention(sweep: dict[str, dict[str, Any]], path: str | os.PathLike[str], title: str = "") -> Path:
    """One panel per method: retention of each task's primary metric against the budget.

    ``sweep``: ``{method: {"budgets": [192, 128, 64], "tasks": {task: [retention or None, ...]},
    "mean": [...]}}`` as built by :func:`mmeff.eval.runner.sweep_summary`. Missing points
    (infeasible budgets) leave gaps.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    methods = list(sweep)
    n = max(1, len(methods))
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.8), squeeze=False, sharey=True)
    for ax, method in zip(axes[0], methods):
        data = sweep[method]
        budgets = data["budgets"]

        def ys(vals: list[float | None]) -> list[float]:
            return [math.nan if v is None else 100.0 * v for v in vals]

        for task, vals in sorted(data["tasks"].items()):
            ax.plot(budgets, ys(vals), marker="o", linewidth=1, markersize=3, alpha=0.7,
                    label=task.removeprefix("mmeff_"))
        if data.get("mean"):
            ax.plot(budgets, ys(data["mean"]), marker="s", linewidth=2.5, color="black", label="mean")
        missing = [str(b) for b, m in zip(budgets, data.get("mean") or []) if m is None]
        if missing:  # infeasible budgets or undefined retention (dense score 0)
            ax.text(0.02, 0.02, f"no result at budget {', '.join(missing)}", transform=ax.transAxes,
                    fontsize=8, color="grey")
        ax.axhline(100.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(method)
        ax.set_xlabel("visual-token budget (equivalent, per image)")
        ax.set_xticks(sorted(set(budgets)))
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("retention vs dense (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=120)


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Lay out, write (creating the folder) and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return out
