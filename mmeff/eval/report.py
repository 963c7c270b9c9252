"""Comparison rows, text tables and the JSON report of ``mmeff eval`` runs.

Retention of a metric is the method's score relative to dense:

- higher-is-better metrics: ``method / dense``;
- hallucination rates in [0, 1] (CHAIR, lower is better): ``(1 - method) / (1 - dense)``, i.e. the
  retained *faithfulness*; other lower-is-better metrics: ``dense / method``;
- behavioural metrics (``yes_ratio``) have no retention.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import sys
from pathlib import Path
from typing import Any

from .tasks import LOWER_IS_BETTER, NOT_QUALITY, TASKS


def metric_values(task_result: dict[str, Any]) -> dict[str, float]:
    """``{"exact_match,none": 0.5, "exact_match_stderr,none": ...}`` -> ``{"exact_match": 0.5}``."""
    out: dict[str, float] = {}
    for key, value in task_result.items():
        if key == "alias" or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        name, _, filt = key.partition(",")
        out[name if filt in ("", "none") else f"{name},{filt}"] = float(value)
    return out


def retention(metric: str, dense: float | None, method: float | None, higher_is_better: bool | None = True) -> float | None:
    """Method score relative to dense (see the module docstring); None where undefined."""
    if dense is None or method is None or metric.split(",")[0] in NOT_QUALITY:
        return None
    lower = metric.split(",")[0] in LOWER_IS_BETTER or higher_is_better is False
    if lower:
        if 0.0 <= dense <= 1.0 and 0.0 <= method <= 1.0:
            return (1.0 - method) / (1.0 - dense) if dense < 1.0 else None
        return dense / method if method > 0 else None
    return method / dense if dense > 0 else None


def primary_metric(task: str, metrics: dict[str, float]) -> str | None:
    """The metric a task is summarised by (retention plots): the spec's for local tasks, else the
    first quality metric lmms-eval reported."""
    spec = TASKS.get(task)
    if spec is not None and spec.primary in metrics:
        return spec.primary
    if "exact_match" in metrics:
        return "exact_match"
    for m in metrics:
        if m.split(",")[0] not in NOT_QUALITY:
            return m
    return None


def compare(dense: dict[str, Any], run: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows (task, metric, dense, method, retention, tokens, budget, times) for one method run."""
    rows: list[dict[str, Any]] = []
    for task, d in dense["tasks"].items():
        m = run["tasks"].get(task)
        if m is None:
            continue
        de, me = d.get("efficiency", {}), m.get("efficiency", {})
        for metric, dv in d["metrics"].items():
            mv = m["metrics"].get(metric)
            hib = d.get("higher_is_better", {}).get(metric, True)
            rows.append({
                "task": task, "metric": metric, "dense": dv, "method": mv,
                "retention": retention(metric, dv, mv, hib), "higher_is_better": hib,
                "visual_tokens_in_dense": de.get("visual_tokens_in"),
                "visual_tokens_in_method": me.get("visual_tokens_in"),
                "equivalent_budget": me.get("equivalent_budget"),
                "prefill_tflops_ratio": (me["prefill_tflops"] / de["prefill_tflops"]
                                         if de.get("prefill_tflops") and me.get("prefill_tflops") is not None else None),
                "seconds_dense": de.get("seconds"), "seconds_method": me.get("seconds"),
            })
    return rows


def _fmt(v: Any, pct: bool = False, digits: int = 3) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _tok(v: float | None) -> str:
    return "-" if v is None else (f"{v:.0f}" if abs(v - round(v)) < 0.05 else f"{v:.1f}")


def format_table(rows: list[dict[str, Any]], method_label: str) -> str:
    """A fixed-width text table; token/budget/time columns appear on each task's first row."""
    head = ["task", "metric", "dense", method_label, "retention", "vis.tokens in", "eq.budget", "prefill FLOPs",
            "time s (dense / method)"]
    body: list[list[str]] = []
    last_task = None
    for r in rows:
        first = r["task"] != last_task
        last_task = r["task"]
        base = r["metric"].split(",")[0]
        lower = base in LOWER_IS_BETTER or (r["higher_is_better"] is False and base not in NOT_QUALITY)
        arrow = " (lower better)" if lower else ""
        body.append([
            r["task"] if first else "", r["metric"] + arrow, _fmt(r["dense"]), _fmt(r["method"]),
            _fmt(r["retention"], pct=True),
            f"{_tok(r['visual_tokens_in_dense'])} -> {_tok(r['visual_tokens_in_method'])}" if first else "",
            _tok(r["equivalent_budget"]) if first else "",
            (_fmt(r["prefill_tflops_ratio"], pct=True) if first else ""),
            (f"{_fmt(r['seconds_dense'], digits=2)} / {_fmt(r['seconds_method'], digits=2)}" if first else ""),
        ])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines)


def format_skipped(run: dict[str, Any]) -> str:
    return f"{run['label']}: skipped ({run.get('error', 'no result')})"


# --------------------------------------------------------------------------- environment

def versions() -> dict[str, str | None]:
    """Versions of the libraries that decide the numbers."""
    from importlib import metadata

    import mmeff

    out: dict[str, str | None] = {"python": sys.version.split()[0], "mmeff": mmeff.__version__}
    for dist in ("torch", "transformers", "lmms_eval", "datasets", "accelerate", "numpy", "pillow", "tokenizers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "hostname": socket.gethostname(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    return info


def write_json(payload: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``payload`` atomically (a temp file next to ``path``, then a rename); no temp file is left on failure."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=2, default=str))
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p
