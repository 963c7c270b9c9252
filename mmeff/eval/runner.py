"""Dense vs method evaluations through lmms-eval's Python API, in one process, one model load.

``run(EvalConfig(model="tiny-llava", methods=["fastv:budget=64"], tasks=["mmeff_pope_random"], limit=50))``

1. mmeff world tasks (``mmeff_*``) get their data and YAMLs from :func:`mmeff.eval.data.prepare_tasks`;
   any other task name (``pope``, ``mme`` ...) is passed to lmms-eval's ``TaskManager`` untouched.
2. The model is loaded once (:class:`~mmeff.eval.lmms_plugin.MmeffLMM`); every run swaps the applied
   methods with :meth:`~mmeff.eval.lmms_plugin.MmeffLMM.set_methods` and calls ``simple_evaluate``.
3. Runs: dense, then each method (with ``sweep``: each method at every budget). A method that
   cannot run (e.g. a budget the model cannot meet) is recorded as skipped with the reason.
4. The result is a JSON-ready dict: config, versions, machine, per-run metrics and efficiency,
   comparison rows vs dense, and (sweep) retention per budget; :func:`main_report` prints tables,
   writes the JSON and the PNG.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError, MmeffError
from . import report as rep
from .tasks import GROUPS, is_local

DEFAULT_BUDGETS = (192, 128, 64)

_TASK_MANAGERS: dict[Any, Any] = {}


@dataclasses.dataclass
class EvalConfig:
    """What ``mmeff eval`` runs (every field has a CLI flag of the same name)."""

    model: str = "tiny-llava"
    methods: list[str] = dataclasses.field(default_factory=list)
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["mmeff_world"])
    limit: int | None = None
    n: int | None = None                 # rows generated per mmeff task (default: limit, else 500)
    split: str = "test"
    seed_offset: int = 0
    batch_size: int = 8
    device: str | None = None
    dtype: str | None = None
    attn_implementation: str = "sdpa"
    sweep: bool = False
    budgets: list[int] = dataclasses.field(default_factory=lambda: list(DEFAULT_BUDGETS))
    gen_kwargs: str | None = None
    bootstrap_iters: int = 0
    log_samples: bool = False
    progress: bool = True
    verbosity: str = "WARNING"
    threads: int | None = None           # torch.set_num_threads (CPU runs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _budget_fields(cfg: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(cfg)} & {"budget", "ratio", "keep"}


def with_budget(spec: str, budget: int) -> str:
    """``spec`` with its budget replaced (and any ratio or keep dropped): the sweep's method at ``budget``.

    For methods joined with ``+`` every method with a ``budget`` option gets it."""
    import mmeff

    from .lmms_plugin import parse_method_arg

    out, changed = [], False
    for part in parse_method_arg(spec):
        cfg = mmeff.parse_method(part)
        fields = _budget_fields(cfg)
        if "budget" in fields:
            changes: dict[str, Any] = {"budget": int(budget)}
            for other in ("ratio", "keep"):
                if other in fields:
                    changes[other] = None
            cfg = dataclasses.replace(cfg, **changes)
            changed = True
        out.append(cfg.spec())
    if not changed:
        raise ConfigError(f"--sweep varies budget=, but {spec!r} has no method with a budget option")
    return "+".join(out)


def canonical(spec: str) -> str:
    """The canonical spelling of a (``+``-joined) method spec."""
    import mmeff

    from .lmms_plugin import parse_method_arg

    return "+".join(mmeff.parse_method(p).spec() for p in parse_method_arg(spec))


def sweep_label(spec: str) -> str:
    """The method of a sweep without its budget: ``fastv:budget=64,layer=3`` -> ``fastv:layer=3``."""
    labels = []
    for part in canonical(spec).split("+"):
        name, _, rest = part.partition(":")
        items = [i for i in rest.split(",") if i and not i.startswith(("budget=", "ratio=", "keep="))]
        labels.append(name + (":" + ",".join(items) if items else ""))
    return "+".join(labels)


def plan_runs(cfg: EvalConfig) -> list[dict[str, Any]]:
    """Dense first, then each ``--method`` value (one run; ``a+b`` applies both), at each budget with ``sweep``."""
    import mmeff

    from .lmms_plugin import parse_method_arg

    runs: list[dict[str, Any]] = [{"label": "dense", "spec": None, "base": None, "budget": None}]
    for raw in cfg.methods:
        spec = canonical(raw)
        if not spec:
            continue
        if cfg.sweep:
            base = sweep_label(spec)
            for b in cfg.budgets:
                s = with_budget(spec, b)
                runs.append({"label": s, "spec": s, "base": base, "budget": int(b)})
        else:
            budgets = [getattr(mmeff.parse_method(p), "budget", None) for p in parse_method_arg(spec)]
            budget = next((b for b in budgets if b is not None), None)
            runs.append({"label": spec, "spec": spec, "base": spec, "budget": budget})
    return runs


def _task_manager(include_path: str | None, verbosity: str, include_defaults: bool = True) -> Any:
    """lmms-eval's TaskManager, cached per process. Indexing lmms-eval's own ~2000 tasks takes
    seconds, so runs over mmeff tasks only leave them out (``include_defaults=False``)."""
    from lmms_eval.tasks import TaskManager

    key = (include_path, verbosity, include_defaults)
    if key not in _TASK_MANAGERS:
        kwargs: dict[str, Any] = {"verbosity": verbosity, "include_defaults": include_defaults}
        if include_path:
            kwargs["include_path"] = include_path
        _TASK_MANAGERS[key] = TaskManager(**kwargs)
    return _TASK_MANAGERS[key]


def _subtasks(res: dict[str, Any], name: str) -> list[str]:
    groups = res.get("group_subtasks", {}) or {}
    if not groups.get(name):  # leaf tasks are listed with no subtasks
        return [name]
    out: list[str] = []
    for t in groups[name]:
        out += _subtasks(res, t)
    return out


def _collect(res: dict[str, Any], lm: Any, log_samples: bool) -> dict[str, Any]:
    tasks: dict[str, Any] = {}
    groups = {g for g, members in (res.get("group_subtasks") or {}).items() if members}
    for task, values in (res.get("results") or {}).items():
        metrics = rep.metric_values(values)
        members = _subtasks(res, task)
        effs = [lm.summary(t) for t in members]
        effs = [e for e in effs if e.get("requests")]
        if len(effs) == 1:
            eff = effs[0]
        elif effs:  # a group: request-weighted means, summed times
            n = sum(e["requests"] for e in effs)
            eff = {"requests": n}
            for k in ("visual_tokens", "visual_tokens_in", "equivalent_budget", "equal_token_budget", "prefill_tflops",
                      "prefill_tflops_dense", "seconds_per_request"):
                if all(k in e for e in effs):
                    eff[k] = sum(e[k] * e["requests"] for e in effs) / n
            for k in ("seconds", "method_seconds"):
                eff[k] = sum(e[k] for e in effs)
        else:
            eff = {"requests": 0}
        entry: dict[str, Any] = {
            "metrics": metrics,
            "higher_is_better": dict((res.get("higher_is_better") or {}).get(task, {}) or {}),
            "is_group": task in groups,
            "n_samples": (res.get("n-samples") or {}).get(task, {}).get("effective"),
            "efficiency": eff,
        }
        if log_samples and task in (res.get("samples") or {}):
            entry["samples"] = [
                {"doc_id": s.get("doc_id"), "target": s.get("target"), "response": (s.get("filtered_resps") or [None])[0]}
                for s in res["samples"][task]
            ]
        tasks[task] = entry
    return tasks


def sweep_summary(runs: list[dict[str, Any]], dense: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{method: {"budgets": [...], "tasks": {task: [retention per budget]}, "mean": [...]}}``
    over leaf tasks' primary metrics."""
    out: dict[str, dict[str, Any]] = {}
    leaf = [t for t, v in dense["tasks"].items() if not v.get("is_group")]
    for r in runs:
        if r["spec"] is None or r["budget"] is None:
            continue
        entry = out.setdefault(r["base"], {"budgets": [], "tasks": {t: [] for t in leaf}, "mean": [],
                                           "equivalent_budget": []})
        entry["budgets"].append(r["budget"])
        vals = []
        for t in leaf:
            d = dense["tasks"][t]["metrics"]
            metric = rep.primary_metric(t, d)
            m = (r.get("tasks") or {}).get(t, {}).get("metrics", {}) if r["status"] == "ok" else {}
            hib = dense["tasks"][t].get("higher_is_better", {}).get(metric, True) if metric else True
            v = rep.retention(metric, d.get(metric), m.get(metric), hib) if metric else None
            entry["tasks"][t].append(v)
            if v is not None:
                vals.append(v)
        entry["mean"].append(sum(vals) / len(vals) if vals else None)
        effs = [((r.get("tasks") or {}).get(t, {}).get("efficiency") or {}).get("equivalent_budget") for t in leaf]
        effs = [e for e in effs if e is not None]
        entry["equivalent_budget"].append(sum(effs) / len(effs) if effs else None)
    return out


def run(cfg: EvalConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate dense and every method run; returns the JSON-ready report (no files written)."""
    import torch

    threads = torch.get_num_threads()
    try:
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        return _run(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: EvalConfig, log: Callable[[str], None]) -> dict[str, Any]:
    from .preflight import check_config, check_methods, check_model_name

    check_config(cfg)
    check_model_name(cfg.model)
    runs = plan_runs(cfg)  # parses every method spec
    local = [t for t in cfg.tasks if is_local(t)]
    if local and len(local) == len(cfg.tasks):  # nothing needs the hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    include_path = None
    if local:
        from .data import prepare_tasks

        include_path = str(prepare_tasks(cfg.n or cfg.limit, cfg.split, cfg.seed_offset))
        log(f"mmeff tasks: {include_path}")

    t_import = time.perf_counter()
    from lmms_eval.evaluator import simple_evaluate

    from .lmms_plugin import MmeffLMM

    tm = _task_manager(include_path, cfg.verbosity, include_defaults=len(local) < len(cfg.tasks))
    unknown = [t for t in cfg.tasks if t not in tm.all_tasks]
    if unknown:
        raise ConfigError(
            f"unknown lmms-eval task(s) {unknown}; mmeff tasks are {sorted(GROUPS['mmeff_world'])} and groups "
            f"{sorted(GROUPS)}; other names must be lmms-eval tasks (see `lmms-eval --tasks list`)"
        )
    lm = MmeffLMM(pretrained=cfg.model, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size,
                  attn_implementation=cfg.attn_implementation, progress=cfg.progress)
    check_methods(lm, [r["spec"] for r in runs if r["spec"]], cfg.model)  # before the dense run
    lm.warmup()
    setup_seconds = time.perf_counter() - t_import

    # data parallel (torchrun, `mmeff eval --processes N`): lmms-eval shards the documents over the
    # process group the model joined and returns the results on rank 0 only
    backend = "torchrun" if lm.world_size > 1 else "accelerate"
    bar = None
    if cfg.progress and len(runs) > 1 and lm.rank == 0:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(runs), desc="mmeff eval runs", position=0)
        except ImportError:  # pragma: no cover
            bar = None
    results: list[dict[str, Any]] = []
    for r in runs:
        r = dict(r)
        if bar is not None:
            bar.set_postfix_str(r["label"])
        try:
            lm.set_methods(r["spec"])
            lm.reset_records()
            t0 = time.perf_counter()
            res = simple_evaluate(model=lm, tasks=list(cfg.tasks), task_manager=tm, limit=cfg.limit,
                                  batch_size=cfg.batch_size, gen_kwargs=cfg.gen_kwargs,
                                  bootstrap_iters=cfg.bootstrap_iters, log_samples=cfg.log_samples,
                                  verbosity=cfg.verbosity, distributed_executor_backend=backend)
            r["wall_seconds"] = time.perf_counter() - t0
            lm.gather_records()  # every process's requests (data parallel), on every process
            r["tasks"] = _collect(res, lm, cfg.log_samples) if res is not None else {}
            r["status"] = "ok"
        except MmeffError as e:  # e.g. a budget this model cannot meet: record and go on
            if r["spec"] is None:
                raise
            r.update(status="skipped", error=f"{type(e).__name__}: {e}", tasks={})
            if bar is not None:
                bar.write(f"[mmeff eval] {r['label']}: skipped ({type(e).__name__}: {e})", file=sys.stderr)
        finally:
            lm.remove_methods()
        results.append(r)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    if lm.rank != 0:
        return {"config": cfg.to_dict(), "rank": lm.rank, "runs": results}
    dense = results[0]
    comparisons = [{"label": r["label"], "rows": rep.compare(dense, r)} for r in results[1:] if r["status"] == "ok"]
    payload: dict[str, Any] = {
        "config": cfg.to_dict(),
        "model": {"pretrained": cfg.model, "class": type(lm.model).__name__, "n_layers": lm.n_layers,
                  "device": str(lm.device), "dtype": str(next(lm.model.parameters()).dtype)},
        "versions": rep.versions(),
        "machine": rep.machine(),
        "processes": lm.world_size,
        "include_path": include_path,
        "setup_seconds": setup_seconds,
        "runs": results,
        "comparisons": comparisons,
    }
    if cfg.sweep:
        payload["sweep"] = sweep_summary(results, dense)
    return payload


def print_report(payload: dict[str, Any], log: Callable[[str], None] = print) -> None:
    """Print one table per method run (and skipped runs)."""
    cfg = payload["config"]
    dense = payload["runs"][0]
    log(f"\nmodel {cfg['model']}  limit {cfg['limit']}  dense wall {dense.get('wall_seconds', 0):.1f}s")
    by_label = {c["label"]: c for c in payload["comparisons"]}
    for r in payload["runs"][1:]:
        if r["status"] != "ok":
            log("\n" + rep.format_skipped(r))
            continue
        log(f"\n== {r['label']} vs dense  (wall {r['wall_seconds']:.1f}s) ==")
        log(rep.format_table(by_label[r["label"]]["rows"], r["label"]))
    if len(payload["runs"]) == 1:
        d = payload["runs"][0]
        log("\n== dense ==")
        for task, v in d["tasks"].items():
            ms = ", ".join(f"{k}={x:.3f}" for k, x in v["metrics"].items())
            log(f"{task}: {ms}  (visual tokens {v['efficiency'].get('visual_tokens_in', '-')})")
    if payload.get("sweep"):
        log("\n== sweep: mean retention of each task's primary metric ==")
        for method, s in payload["sweep"].items():
            cells = [f"{b}: {'-' if m is None else f'{100 * m:.1f}%'}" for b, m in zip(s["budgets"], s["mean"])]
            log(f"{method}: " + "  ".join(cells))


def main_report(cfg: EvalConfig, out: str | os.PathLike[str] | None, plot: str | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run, print tables, write the JSON (``out``) and with ``sweep`` the PNG (``plot`` or next to ``out``).

    ``out`` may name a folder (``runs/``: a new file inside it). Both paths are proven writable before
    anything runs; should the JSON still fail to write at the end, it goes to the temp folder instead
    (``payload["json"]``, with the reason in ``payload["json_error"]``), so a finished run is never lost.
    """
    from .preflight import check_config, check_model_name, check_writable, resolve_out

    check_config(cfg)  # bad input fails before the output folder is made
    check_model_name(cfg.model)
    out_path = resolve_out(out, cfg.model) if out is not None else None
    png = None
    if cfg.sweep:
        png = Path(plot) if plot else (out_path.with_suffix(".png") if out_path else Path("mmeff-eval-sweep.png"))
        check_writable(png, "--plot")
    payload = run(cfg, log=log)
    if payload.get("rank", 0) != 0:  # data parallel: rank 0 reports for everyone
        return payload
    print_report(payload, log=log)
    if png is not None and payload.get("sweep"):
        from .plots import plot_retention

        title = f"{cfg.model}: retention vs budget ({', '.join(cfg.tasks)})"
        try:
            payload["plot"] = str(plot_retention(payload["sweep"], png, title=title))
            log(f"plot -> {payload['plot']}")
        except OSError as e:  # the JSON below still keeps every number
            payload["plot_error"] = f"{png}: {e}"
    if out_path is not None:
        try:
            payload["json"] = str(rep.write_json(payload, out_path))
        except OSError as e:
            from .preflight import default_name

            payload["json_error"] = f"{out_path}: {e.strerror or e}"
            rescue = Path(tempfile.gettempdir()) / default_name(cfg.model)
            payload["json"] = str(rep.write_json(payload, rescue))
        log(f"json -> {payload['json']}")
    return payload


def failed_runs(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The requested method runs that did not run (recorded as skipped with their reason)."""
    return [r for r in payload["runs"] if r.get("status") != "ok"]
