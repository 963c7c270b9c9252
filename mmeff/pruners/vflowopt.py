"""VFlowOpt (ICCV 2025, arXiv 2508.05211): ViT importance map, pre-LLM prune + recycle, progressive LLM cuts.

The host's vision stage reads one ViT layer's attention (context relevance of global tokens) and the patch
pixels (entropy) and lays the map out per image (``mmeff.hosts.vit_layout``). This config decides:
- before the LLM, keep ``round(N * ratio_v)`` of an image's N tokens and recycle the least important ones
  per grid cell of side ``vit_m`` (:mod:`.vflowopt_select`);
- inside the LLM, at ``llm_layers`` (default L/3 and 2L/3), keep ``ratio_1`` then ``ratio_2`` of the
  remaining visual tokens with the highest *ViT* importance (carried from the vision stage).
Hyperparameters come, in this order, from the options given, a calibration JSON (``calibration=FILE``, written
by ``mmeff calibrate vflowopt``; or ``vflowopt.json`` next to a zoo model), then the released 25% config.
The last LLM ratio (or, when the budget differs from the calibrated one, ratio_v) is solved from the
layer-averaged budget (:mod:`.vflowopt_schedule`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..core.config import require
from ..core.errors import ConfigError
from ..core.registry import register_method
from .base import PrunerConfig, ScoreView, Stage
from .vflowopt_schedule import solve_last_ratio, solve_ratio_v
from .vflowopt_select import prune_and_recycle

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The released LLaVA-OV-7B config for 25% retention (vit_r=0.2651, llm_r=[0.9833, 0.8773] at layers 9/18 of 28).
RELEASED = {"vit_t": 34.76, "vit_m": 15.58, "alpha_v": 0.0, "ratio_1": 0.9833, "ratio_2": 0.8773}
ZOO_FILE = "vflowopt.json"
CARRY = "vit_importance"  # the per-token value the LLM cuts rank by


@dataclasses.dataclass(frozen=True)
class VFlowOptParams:
    """Everything VFlowOpt uses for one image of ``n_visual`` tokens, after defaults and calibration."""

    vit_t: float
    vit_m: float
    alpha_v: float
    ratio_v: float
    llm_layers: tuple[int, ...]
    llm_ratios: tuple[float, ...]
    source: str


@register_method
@dataclasses.dataclass(frozen=True)
class VFlowOpt(PrunerConfig):
    """Options beyond ``budget=`` / ``ratio=`` (the layer-averaged visual tokens per image):

    vit_layer: ViT layer read for the importance map (None: the layer producing the LLM's features).
    vit_t: global-token threshold (times the mean received attention). vit_m: recycling cell side (tokens).
    alpha_v: weight of the softmaxed patch entropy. ratio_v: pre-LLM keep ratio. ratio_1: first LLM cut's ratio.
    llm_layers: the LLM cut layers (None: round(L/3), round(2L/3)).
    calibration: JSON from ``mmeff calibrate vflowopt`` (a missing file is an error).
    count: "exact" (the pre-LLM cut keeps exactly round(N * ratio_v) tokens, recycled ones included) or "released"
           (the released pool size, which can overshoot the budget by a few tokens; see vflowopt_select).
    pixel_mean / pixel_std: the processor's normalisation, undone before the patch entropy (CLIP's by default).
    """

    name: ClassVar[str] = "vflowopt"
    stage: ClassVar[Stage] = "pre_llm"
    needs: ClassVar[frozenset[str]] = frozenset({"vit_importance"})
    runs_llm_cuts: ClassVar[bool] = True  # the chain-of-cuts host runs the LLM cuts (False: pre-LLM only)

    vit_layer: int | None = None
    vit_t: float | None = None
    vit_m: float | None = None
    alpha_v: float | None = None
    ratio_v: float | None = None
    ratio_1: float | None = None
    llm_layers: tuple[int, ...] | None = None
    calibration: str | None = None
    count: str = "exact"
    pixel_mean: tuple[float, ...] = CLIP_MEAN
    pixel_std: tuple[float, ...] = CLIP_STD

    def validate(self) -> None:
        super().validate()
        require(self.keep is None, "vflowopt: give budget= (layer-averaged tokens per image) or ratio=, not keep=")
        require(self.vit_layer is None or self.vit_layer >= 0, f"vflowopt: vit_layer must be >= 0, got {self.vit_layer}")
        require(self.vit_t is None or self.vit_t >= 0, f"vflowopt: vit_t must be >= 0, got {self.vit_t}")
        require(self.vit_m is None or self.vit_m > 0, f"vflowopt: vit_m must be > 0, got {self.vit_m}")
        for key in ("ratio_v", "ratio_1"):
            v = getattr(self, key)
            require(v is None or 0.0 < v <= 1.0, f"vflowopt: {key} must be in (0, 1], got {v}")
        require(self.count in ("exact", "released"),
                f"vflowopt: count must be 'exact' or 'released', got {self.count!r}")
        require(self.llm_layers is None or list(self.llm_layers) == sorted(set(self.llm_layers)),
                f"vflowopt: llm_layers must be increasing, got {self.llm_layers}")
        require(len(self.pixel_mean) == len(self.pixel_std) and all(s > 0 for s in self.pixel_std),
                "vflowopt: pixel_mean and pixel_std need one positive std per channel")
        if self.calibration is not None:
            require(Path(self.calibration).is_file(),
                    f"vflowopt: calibration file {self.calibration!r} not found; create it with "
                    "`mmeff calibrate vflowopt --model M --budget B --out FILE`, or leave calibration unset")

    # ------------------------------------------------------------------ hyperparameters
    def bound_to(self, model: Any) -> "VFlowOpt":
        """This config with the model's own calibration (a zoo model's ``vflowopt.json``) when none was given."""
        source = getattr(getattr(model, "config", None), "_name_or_path", None)
        if self.calibration is not None or not source or not (Path(source) / ZOO_FILE).is_file():
            return self
        return dataclasses.replace(self, calibration=str(Path(source) / ZOO_FILE))

    def calibration_data(self) -> tuple[dict[str, Any] | None, str]:
        """(calibrated values, where from): the calibration file when given, else None (the released config)."""
        if self.calibration is None:
            return None, "released 25% config"
        path = Path(self.calibration)
        try:
            data = json.loads(path.read_text())
            return data["params"] | {"budget_fraction": data["budget_fraction"],
                                     "llm_layers": data.get("llm_layers", [])}, str(path)
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"vflowopt: {path} is not a vflowopt calibration file ({exc}); rerun "
                              "`mmeff calibrate vflowopt`") from exc

    def hyper(self, key: str) -> float:
        """One of vit_t / vit_m / alpha_v: the option given, else the calibration, else the released value."""
        given = getattr(self, key)
        if given is not None:
            return float(given)
        cal, _ = self.calibration_data()
        return float({**RELEASED, **(cal or {})}[key])

    def default_llm_layers(self, n_layers: int) -> tuple[int, ...]:
        if self.llm_layers is not None:
            bad = [k for k in self.llm_layers if not 1 <= k < n_layers]
            if bad:
                raise ConfigError(f"vflowopt: llm_layers {bad} do not exist; use layers in 1..{n_layers - 1}")
            return tuple(self.llm_layers)
        first, second = max(1, round(n_layers / 3)), max(2, round(2 * n_layers / 3))
        return (first, second) if second < n_layers and first < second else (first,)

    def params(self, n_visual: int, n_layers: int) -> VFlowOptParams:
        """Resolve every hyperparameter for an image of ``n_visual`` tokens (see the module docstring)."""
        cal, source = self.calibration_data()
        base = {**RELEASED, **(cal or {})}
        pick = lambda key: getattr(self, key) if getattr(self, key) is not None else float(base[key])
        fraction = (self.budget / n_visual) if self.budget is not None else float(self.ratio)
        layers = self.default_llm_layers(n_layers) if self.runs_llm_cuts else ()
        if not layers:  # everything before the LLM: the budget is the pre-LLM keep ratio
            ratio_v = self.ratio_v if self.ratio_v is not None else min(1.0, fraction)
            return VFlowOptParams(pick("vit_t"), pick("vit_m"), pick("alpha_v"), ratio_v, (), (), source)
        if fraction >= 1.0:  # the whole image's tokens: every stage keeps everything
            return VFlowOptParams(pick("vit_t"), pick("vit_m"), pick("alpha_v"), 1.0, layers, (1.0,) * len(layers),
                                  source)
        budget = fraction * n_visual
        ratio_1 = pick("ratio_1")
        middle = (ratio_1,) * (len(layers) - 1)
        calibrated_budget = (cal is not None and abs(float(cal["budget_fraction"]) - fraction) < 1e-9
                             and tuple(cal.get("llm_layers", ())) == layers and "ratio_2" in cal)
        if self.ratio_v is not None or calibrated_budget:
            ratio_v = self.ratio_v if self.ratio_v is not None else float(base["ratio_v"])
            last = solve_last_ratio(budget, n_visual, ratio_v, middle, layers, n_layers)
        else:
            last = float(base["ratio_2"]) if len(layers) > 1 else ratio_1
            ratio_v = solve_ratio_v(budget, n_visual, (*middle, last), layers, n_layers)
        return VFlowOptParams(pick("vit_t"), pick("vit_m"), pick("alpha_v"), ratio_v, layers, (*middle, last), source)

    # ------------------------------------------------------------------ the plan: pre-LLM cut, then LLM cuts
    def plan_layers(self, family: str, n_layers: int) -> tuple[int, ...]:
        """0 (before the LLM), then the LLM cut layers when the host runs chains of cuts."""
        return (0, *(self.default_llm_layers(n_layers) if self.runs_llm_cuts else ()))

    def keep_schedule(self, n_visual: int, n_layers: int, layers: tuple[int, ...], family: str = "") -> list[int]:
        """Nominal tokens kept after each cut: round(N r_v), then each LLM cut keeps its ratio of the previous.

        The pre-LLM cut's actual count follows the released recycling rule (a few tokens either way); the LLM
        cuts use these nominal counts (static shapes), capped by what the previous cut really kept.
        """
        self.keep_count(n_visual, n_layers, 0)  # budget above the image's tokens: BudgetError
        p = self.params(n_visual, n_layers)
        counts = [min(n_visual, round(n_visual * p.ratio_v))]
        for r in p.llm_ratios[:len(layers) - 1]:
            counts.append(round(counts[-1] * r))
        return counts

    def score(self, view: ScoreView) -> torch.Tensor:
        """Cut 0: the ViT importance map; later cuts: the same importance, carried with the kept tokens."""
        if getattr(view, "cut", 0) == 0:
            return torch.cat([m.importance for m in view.vit_maps()])
        return view.carry[CARRY]

    def select(self, view: ScoreView, keep_per_image: list[int]) -> torch.Tensor:
        """Cut 0: prune + recycle per image (merges handed to the host); later cuts: top-k by ViT importance."""
        if getattr(view, "cut", 0) != 0:
            return super().select(view, keep_per_image)
        kept, merges, maps = [], [], view.vit_maps()
        for (start, end), image in zip(view.spans, maps):
            n = end - start
            p = view.vflowopt_params(n)
            keep = min(n, round(n * p.ratio_v))
            local, recycle = prune_and_recycle(image.importance, image.coords, image.region, keep, p.vit_m,
                                               self.count)
            kept.append(local + start)
            merges.append(recycle)
        view.set_recycling(merges)
        if hasattr(view, "carry"):  # the chain host gathers it through the later cuts
            view.carry[CARRY] = torch.cat([m.importance for m in maps])
        return torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)
