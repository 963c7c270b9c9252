"""VFlowOpt's visual-information-flow calibration: Bayesian optimisation of its hyperparameters.

Objective (the paper's): the mean cosine between the full and the pruned model's final hidden state of the
last input token, over N calibration scenes. Searched: ratio_v, ratio_1, vit_t, vit_m and alpha_v; the last
LLM ratio is solved from the layer-averaged budget. optuna's TPE sampler (seeded) drives the search; the
study lives in an SQLite file, so an interrupted run resumes where it stopped.

The two ratios are sampled in a unit square and mapped onto their *feasible* ranges (ratio_v in
[b, 0.95 * b * L / k_1], b = budget / N; ratio_1 in [0.3, 1] times the largest value the budget allows for that
ratio_v), so no trial is wasted on a schedule that cannot meet the budget.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable

import torch

from ..core.errors import ConfigError
from . import record


def last_token_states(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """[samples, D] final-layer hidden state of each prompt's last token (batches are left-padded).

    Pruning shortens the sequence, so the last *position* is read, which is the last input token only when
    the padding is on the left.
    """
    states = []
    for batch in batches:
        mask = batch.get("attention_mask")
        if mask is not None and not bool(mask[:, -1].all()):
            raise ConfigError("vflowopt calibration needs left-padded batches (processor.tokenizer.padding_side='left')")
        out = model(**batch, output_hidden_states=True, use_cache=False)
        states.append(out.hidden_states[-1][:, -1].float())
    return torch.cat(states)


def feasible_ratios(u_v: float, u_1: float, fraction: float, layers: tuple[int, ...],
                    n_layers: int) -> tuple[float, float | None]:
    """Map a point of the unit square onto (ratio_v, ratio_1) that the budget fraction can accommodate."""
    if not layers:
        return min(1.0, fraction), None
    hi_v = min(1.0, 0.95 * fraction * n_layers / layers[0])
    ratio_v = fraction + u_v * max(0.0, hi_v - fraction) if hi_v > fraction else hi_v
    if len(layers) < 2:
        return ratio_v, None
    k1, k2 = layers[0], layers[1]
    hi_1 = min(1.0, (fraction * n_layers / ratio_v - k1) / (k2 - k1))
    return ratio_v, max(1e-3, hi_1 * (0.3 + 0.7 * u_1))


def calibrate_vflowopt(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], budget: float, *,
                       trials: int, storage: str | Path, seed: int = 0, out_path: str | Path | None = None,
                       model_name: str = "", progress: bool = True, timeout: float | None = None) -> dict[str, Any]:
    """Run (or resume) the study until it holds ``trials`` finished trials (or ``timeout`` seconds pass)."""
    import optuna

    import mmeff

    from ..pruners.vflowopt import VFlowOpt

    batches = list(batches)
    image_id = int(model.config.image_token_id)
    n_visual = int((batches[0]["input_ids"][0] == image_id).sum())
    if budget >= n_visual or budget <= 0:
        raise ConfigError(f"vflowopt calibration: budget must be in (0, {n_visual}) visual tokens, got {budget:g}")
    n_layers = len(model.model.language_model.layers)
    fraction = budget / n_visual
    layers = VFlowOpt(budget=budget).default_llm_layers(n_layers) if _host_supports_cuts() else ()
    side = _grid_side(model, batches[0])

    with torch.no_grad():
        dense = last_token_states(model, batches)

    def objective(trial: "optuna.Trial") -> float:
        ratio_v, ratio_1 = feasible_ratios(trial.suggest_float("u_v", 0.0, 1.0), trial.suggest_float("u_1", 0.0, 1.0),
                                           fraction, layers, n_layers)
        method = VFlowOpt(budget=budget, ratio_v=ratio_v, ratio_1=ratio_1,
                          vit_t=trial.suggest_float("vit_t", 0.0, 50.0),
                          vit_m=trial.suggest_float("vit_m", 2.0, float(side)),
                          alpha_v=trial.suggest_float("alpha_v", -1.0, 1.0))
        with torch.no_grad(), mmeff.apply(model, method):
            pruned = last_token_states(model, batches)
        trial.set_user_attr("ratio_v", ratio_v)
        trial.set_user_attr("ratio_1", ratio_1)
        return float(torch.nn.functional.cosine_similarity(dense, pruned, dim=-1).mean())

    name = f"vflowopt-{model_name or type(model).__name__}-b{budget:g}"
    study = optuna.create_study(study_name=name, storage=_sqlite_url(storage), load_if_exists=True,
                                direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    done = len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])
    start = time.perf_counter()
    if trials > done:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study.optimize(objective, n_trials=trials - done, timeout=timeout, show_progress_bar=progress)
    best = study.best_trial
    params = _best_params(best, budget, n_visual, layers, n_layers)
    result = {
        "method": "vflowopt", "model": model_name or type(model).__name__, "budget": budget,
        "budget_fraction": fraction, "n_visual": n_visual, "llm_layers": list(layers), "params": params,
        "objective_mean_cosine": best.value, "trials": len(study.trials), "best_trial": best.number,
        "split": "calib",
        "samples": int(dense.shape[0]), "seed": seed, "seconds_this_run": time.perf_counter() - start,
        "seconds_all_trials": sum((t.duration.total_seconds() for t in study.trials if t.duration), 0.0),
        "versions": record.versions("optuna"),
    }
    return record.save(result, out_path)


def _best_params(best: Any, budget: float, n_visual: int, layers: tuple[int, ...], n_layers: int) -> dict[str, float]:
    from ..pruners.vflowopt_schedule import solve_last_ratio

    ratio_v, ratio_1 = best.user_attrs["ratio_v"], best.user_attrs["ratio_1"]
    params = {"vit_t": best.params["vit_t"], "vit_m": best.params["vit_m"], "alpha_v": best.params["alpha_v"],
              "ratio_v": ratio_v}
    if ratio_1 is not None:
        params["ratio_1"] = ratio_1
        params["ratio_2"] = solve_last_ratio(budget, n_visual, ratio_v, (ratio_1,), layers, n_layers)
    return params


def _host_supports_cuts() -> bool:
    """Whether the VLM host runs VFlowOpt's LLM cuts (the chain of cuts); else only the pre-LLM stage."""
    from ..pruners.vflowopt import VFlowOpt

    return bool(getattr(VFlowOpt, "runs_llm_cuts", False))


def _grid_side(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Longest side of the token grid the recycling cells live on (the merged grid for Qwen): vit_m's range."""
    vc = model.config.vision_config
    grid = batch.get("image_grid_thw")
    if grid is not None:
        return int(grid[0, 1:].max()) // int(vc.spatial_merge_size)
    return vc.image_size // vc.patch_size


def _sqlite_url(storage: str | Path) -> str:
    s = str(storage)
    if s.startswith("sqlite:"):
        return s
    Path(s).parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(s).resolve()}"


