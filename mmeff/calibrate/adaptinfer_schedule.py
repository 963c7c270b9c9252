"""AdaptInfer's offline schedule: the layers where text-to-vision attention shifts most [recon of the paper].

On N calibration scenes, for every LLM layer l the text tokens after the image score the visual tokens with
AdaptInfer's own rule (text-prior-weighted text-to-vision attention, text rows only). The layer-to-layer shift is
1 - Jaccard of the top-``top_fraction`` visual sets of layers l-1 and l (the Jensen-Shannon divergence of the
normalised scores is recorded beside it), averaged over the scenes. The pruning layers are the ``n_cuts`` largest
local maxima of that curve (inflection points), filled with the next largest shifts when there are fewer peaks.
The scores are read by running the model under a keep-everything plan that "cuts" before every layer, so the
outputs are the dense ones and no L x L attention map is built.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, ClassVar, Iterable

import torch
from tqdm import tqdm

from ..pruners import adaptinfer_math as am
from ..pruners.base import PrunerConfig, ScoreView
from . import record


@dataclasses.dataclass(frozen=True)
class _Probe(PrunerConfig):
    """Keep everything, but score at every layer (records AdaptInfer's scores of layers 0 .. L-2)."""

    name: ClassVar[str] = "adaptinfer_probe"
    sink: list = dataclasses.field(default_factory=list, compare=False, repr=False)

    def plan_layers(self, family: str, n_layers: int) -> tuple[int, ...]:
        return tuple(range(1, n_layers))

    def keep_schedule(self, n_visual: int, n_layers: int, layers: tuple[int, ...], family: str = "") -> list[int]:
        return [n_visual] * len(layers)

    def score(self, view: ScoreView) -> torch.Tensor:
        s = am.text_prior_scores(view.text_rows_full_attention(), view.text_positions, view.visual_positions)
        self.sink.append((view.sample, view.layer - 1, s.detach().float().cpu()))
        return s


def _jaccard_shift(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    ta, tb = set(torch.topk(a, k).indices.tolist()), set(torch.topk(b, k).indices.tolist())
    return 1.0 - len(ta & tb) / len(ta | tb)


def _js(a: torch.Tensor, b: torch.Tensor) -> float:
    p, q = a.clamp_min(0) + 1e-12, b.clamp_min(0) + 1e-12
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    return float(0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum())


def inflection_layers(shift: list[float], n_cuts: int) -> list[int]:
    """``n_cuts`` pruning layers from a shift curve indexed by layer (shift[0] is undefined and ignored)."""
    top = len(shift) - 1
    if top < n_cuts:
        raise ValueError(f"a {len(shift)}-layer curve cannot give {n_cuts} pruning layers")
    cand = range(1, top + 1)
    peaks = [l for l in cand if shift[l] >= shift[l - 1] and (l == top or shift[l] >= shift[l + 1])]
    chosen = sorted(peaks, key=lambda l: -shift[l])[:n_cuts]
    rest = sorted((l for l in cand if l not in chosen), key=lambda l: -shift[l])
    chosen += rest[:n_cuts - len(chosen)]
    return sorted(chosen)


@torch.no_grad()
def layer_shifts(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], top_fraction: float = 0.1,
                 progress: bool = True) -> dict[str, list[float]]:
    """Mean per-layer shift of AdaptInfer's text-to-vision scores (index l: between layers l-1 and l)."""
    from .. import apply

    n_layers = len(model.model.language_model.layers)
    probe = _Probe(ratio=1.0)
    jac = [0.0] * (n_layers - 1)
    js = [0.0] * (n_layers - 1)
    count = 0
    with apply(model, probe):
        for batch in tqdm(list(batches), desc="AdaptInfer calibration", disable=not progress):
            probe.sink.clear()
            model(**batch, use_cache=False)
            per_sample: dict[int, dict[int, torch.Tensor]] = {}
            for b, layer, s in probe.sink:
                per_sample.setdefault(b, {})[layer] = s
            for scores in per_sample.values():
                k = max(1, int(top_fraction * scores[0].numel()))
                for layer in range(1, n_layers - 1):
                    jac[layer] += _jaccard_shift(scores[layer - 1], scores[layer], k)
                    js[layer] += _js(scores[layer - 1], scores[layer])
                count += 1
    if count == 0:
        raise ValueError("AdaptInfer calibration needs samples with images")
    return {"jaccard_shift": [v / count for v in jac], "js_shift": [v / count for v in js]}


def calibrate_adaptinfer(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                         out_path: str | Path | None = None, *, model_name: str = "", n_cuts: int = 3,
                         top_fraction: float = 0.1, progress: bool = True) -> dict[str, Any]:
    """Find the pruning layers and (optionally) write the JSON that ``AdaptInfer(schedule=...)`` reads."""

    batches = list(batches)
    start = time.perf_counter()
    curves = layer_shifts(model, batches, top_fraction, progress)
    n_layers = len(model.model.language_model.layers)
    layers = inflection_layers(curves["jaccard_shift"], n_cuts)
    result = {
        "method": "adaptinfer", "model": model_name or type(model).__name__, "n_layers": n_layers,
        "layers": layers, "cut_layers": [l + 1 for l in layers], "metric": f"1 - Jaccard(top {top_fraction:g})",
        **curves, "samples": sum(int(b["input_ids"].shape[0]) for b in batches),
        "seconds": round(time.perf_counter() - start, 2), "torch_threads": torch.get_num_threads(),
        "versions": record.versions(),
    }
    return record.save(result, out_path)


__all__ = ["calibrate_adaptinfer", "inflection_layers", "layer_shifts"]
