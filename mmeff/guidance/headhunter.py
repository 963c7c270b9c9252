"""HeadHunter: greedy iterative search for the heads (or layers) whose SoftPAG perturbation helps an objective.

Algorithm (arXiv 2506.10978, Alg. 1), in rounds r = 1..R:
1. for every candidate c still in the pool, generate the prompt/seed set with SoftPAG on ``selected + [c]``;
2. score c by the mean of ``objective(images, prompts)``;
3. move the top-k candidates (highest score, or lowest with ``maximize=False``) into ``selected``.
The objective without SoftPAG (``baseline``) and the composed selection after every round
(``selection_score``) are scored too, so the log shows whether the picks beat guidance-free sampling on the
search set at all. ``keep="best"`` returns the selection after the round that scored best (the released
script validates after every round; a later round's picks can hurt together what they helped alone), the
default ``keep="last"`` the selection after round R as in Alg. 1. Later rounds therefore pick candidates
that work *together* with earlier picks. Cost: M prompts x N
candidates x R rounds generations.

The driver is generic: it calls the stock pipeline with SoftPAG applied through ``mmeff.apply`` and never
looks inside the model (candidate lists come from the DiT adapter's description of the attention sites).
The search is resumable: a JSON state file is rewritten (atomically) after every candidate; rerunning with
the same settings and state file continues where it stopped. The result saves as a SoftPAG preset
(``{"heads": ["l,h", ...]}``) that ``SoftPAG(preset=path)`` loads.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.errors import ConfigError
from ..core.registry import find_host
from .softpag import SoftPAG, parse_head, save_preset

Objective = Callable[[Any, list[str]], Sequence[float]]
STATE_FORMAT = "mmeff.headhunter.state/1"


@dataclasses.dataclass
class SearchResult:
    """Selected heads in pick order, per-round history, and where the state lives."""

    heads: list[tuple[int, int]]
    candidates: list[str]
    history: list[dict[str, Any]]
    state_path: Path | None
    meta: dict[str, Any]
    baseline: float | None = None  # the objective of the unmodified pipeline on the search set

    def save_preset(self, path: str | Path) -> Path:
        return save_preset(path, self.heads, **self.meta, picked=self.candidates)


class HeadHunter:
    """Greedy head/layer search driver for SoftPAG on a diffusers DiT pipeline.

    ``objective(images, prompts) -> list[float]`` scores one generated batch (higher is better unless
    ``maximize=False``). ``candidates`` is ``"heads"`` (every (layer, head)), ``"layers"`` (whole layers), or an
    explicit iterable of ``(l, h)`` / ``"l.h"`` heads or ``int`` layers. ``call_kwargs`` go to every pipeline
    call (steps, size, ``guidance_scale`` ...); each prompt i uses seed ``seeds[i]`` (default: i).
    """

    def __init__(self, pipe: Any, objective: Objective, prompts: Sequence[str], seeds: Sequence[int] | None = None,
                 *, rounds: int = 5, top_k: int = 3, candidates: str | Iterable[Any] = "heads", u: float = 1.0,
                 scale: float = 3.0, mode: str = "joint_identity", call_kwargs: dict[str, Any] | None = None,
                 state_path: str | Path | None = None, maximize: bool = True, batch_size: int | None = None,
                 progress: bool = True, keep: str = "last") -> None:
        if not prompts:
            raise ConfigError("HeadHunter needs at least one prompt")
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise ConfigError(f"HeadHunter: {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        if keep not in ("last", "best"):
            raise ConfigError(f"HeadHunter: keep must be 'last' (Alg. 1) or 'best' (best-scoring round), got {keep!r}")
        self.keep = keep
        if rounds < 1 or top_k < 1:
            raise ConfigError(f"HeadHunter: rounds and top_k must be >= 1, got rounds={rounds}, top_k={top_k}")
        SoftPAG(heads="0.0", u=u, scale=scale, mode=mode)  # validates u/scale/mode early
        self.pipe, self.objective = pipe, objective
        self.prompts, self.seeds = list(prompts), seeds
        self.rounds, self.top_k = rounds, top_k
        self.u, self.scale, self.mode = u, scale, mode
        self.call_kwargs = dict(call_kwargs or {})
        self.state_path = Path(state_path) if state_path is not None else None
        self.maximize, self.progress = maximize, progress
        self.batch_size = batch_size or len(self.prompts)
        self.info = find_host(pipe)(pipe).info
        self.pool = self._candidates(candidates)
        self.evaluations = 0

    # ------------------------------------------------------------------ candidates
    def _candidates(self, spec: str | Iterable[Any]) -> list[str]:
        per_layer = self.info.heads_per_layer()
        if spec == "heads":
            return [f"{l}.{h}" for l, n in sorted(per_layer.items()) for h in range(n)]
        if spec == "layers":
            return [str(l) for l in sorted(per_layer)]
        if isinstance(spec, str):
            raise ConfigError(f"HeadHunter: candidates must be 'heads', 'layers' or a list, got {spec!r}")
        out = []
        for item in spec:
            if isinstance(item, int):
                if item not in per_layer:
                    raise ConfigError(f"HeadHunter: layer {item} does not exist (layers 0..{len(per_layer) - 1})")
                out.append(str(item))
            else:
                l, h = parse_head(item)
                if l not in per_layer or not 0 <= h < per_layer[l]:
                    raise ConfigError(f"HeadHunter: head {l}.{h} does not exist in {self.info.model_class}")
                out.append(f"{l}.{h}")
        if not out:
            raise ConfigError("HeadHunter: the candidate list is empty")
        return list(dict.fromkeys(out))

    def _config(self, selection: list[str]) -> SoftPAG:
        heads = [c for c in selection if "." in c]
        layers = [int(c) for c in selection if "." not in c]
        return SoftPAG(heads=tuple(heads), layers=tuple(layers), u=self.u, scale=self.scale, mode=self.mode)

    def _expand(self, selection: list[str]) -> list[tuple[int, int]]:
        per_layer = self.info.heads_per_layer()
        pairs: list[tuple[int, int]] = []
        for c in selection:
            if "." in c:
                pairs.append(parse_head(c))
            else:
                pairs.extend((int(c), h) for h in range(per_layer[int(c)]))
        return list(dict.fromkeys(pairs))

    # ------------------------------------------------------------------ scoring
    def generate(self, config: SoftPAG | None) -> list[Any]:
        """Images for every prompt/seed (with ``config`` applied, or unmodified when None)."""
        import mmeff

        images: list[Any] = []
        for i in range(0, len(self.prompts), self.batch_size):
            prompts = self.prompts[i:i + self.batch_size]
            gens = [torch.Generator().manual_seed(int(s)) for s in self.seeds[i:i + self.batch_size]]
            if config is None:
                out = self.pipe(prompt=prompts, generator=gens, **self.call_kwargs)
            else:
                with mmeff.apply(self.pipe, config):
                    out = self.pipe(prompt=prompts, generator=gens, **self.call_kwargs)
            batch = getattr(out, "images", None)
            batch = getattr(out, "frames", None) if batch is None else batch
            images.extend(list(batch if batch is not None else out[0]))
        return images

    def score(self, selection: list[str]) -> float:
        """Mean objective with SoftPAG on ``selection`` (an empty selection: the unmodified pipeline)."""
        images = self.generate(self._config(selection) if selection else None)
        values = [float(x) for x in self.objective(images, list(self.prompts))]
        if len(values) != len(self.prompts):
            raise ConfigError(f"HeadHunter: the objective returned {len(values)} scores for {len(self.prompts)} images")
        self.evaluations += 1
        return sum(values) / len(values)

    # ------------------------------------------------------------------ state
    def _signature(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "seeds": self.seeds, "rounds": self.rounds, "top_k": self.top_k,
                "u": self.u, "scale": self.scale, "mode": self.mode, "maximize": self.maximize,
                "candidates": self.pool, "model": self.info.model_class,
                "objective": getattr(self.objective, "__name__", type(self.objective).__name__),
                "call_kwargs": json.loads(json.dumps(self.call_kwargs, sort_keys=True, default=repr))}

    def _load(self) -> dict[str, Any]:
        fresh = {"format": STATE_FORMAT, "signature": self._signature(), "selected": [], "round": 0,
                 "scores": {}, "history": [], "done": False}
        if self.state_path is None or not self.state_path.exists():
            return fresh
        state = json.loads(self.state_path.read_text())
        if state.get("format") != STATE_FORMAT or state.get("signature") != fresh["signature"]:
            raise ConfigError(f"HeadHunter: state file {self.state_path} was written by a different search (other "
                              "prompts, seeds, candidates or settings); delete it or pass another state_path")
        return state

    def _save(self, state: dict[str, Any]) -> None:
        if self.state_path is None:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(self.state_path.suffix + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.state_path)

    # ------------------------------------------------------------------ search
    def run(self) -> SearchResult:
        from tqdm.auto import tqdm

        state = self._load()
        if state.get("baseline") is None:
            state["baseline"] = self.score([])
            self._save(state)
        while not state["done"] and state["round"] < self.rounds:
            r = state["round"]
            pool = [c for c in self.pool if c not in state["selected"]]
            todo = [c for c in pool if c not in state["scores"]]
            bar = tqdm(total=len(pool), initial=len(pool) - len(todo), disable=not self.progress,
                       desc=f"HeadHunter round {r + 1}/{self.rounds}")
            for cand in todo:
                state["scores"][cand] = self.score(state["selected"] + [cand])
                self._save(state)
                bar.update(1)
            bar.close()
            ranked = sorted(pool, key=lambda c: state["scores"][c], reverse=self.maximize)
            added = ranked[:self.top_k]
            state["history"].append({"round": r, "added": added,
                                     "scores": {c: state["scores"][c] for c in ranked}})
            state["selected"] = state["selected"] + added
            state["history"][-1]["selection_score"] = self.score(state["selected"])
            state["scores"] = {}
            state["round"] = r + 1
            state["done"] = state["round"] >= self.rounds or len(state["selected"]) >= len(self.pool)
            self._save(state)
        kept, kept_round = self._kept(state)
        return SearchResult(heads=self._expand(kept), candidates=kept,
                            history=state["history"], state_path=self.state_path, baseline=state["baseline"],
                            meta={"model": self.info.model_class, "rounds": self.rounds, "top_k": self.top_k,
                                  "u": self.u, "scale": self.scale, "mode": self.mode, "keep": self.keep,
                                  "kept_round": kept_round, "objective": self._signature()["objective"]})

    def _kept(self, state: dict[str, Any]) -> tuple[list[str], int]:
        """The selection to return and the round it ends with (``keep``)."""
        history = state["history"]
        if self.keep == "last" or not history:
            return list(state["selected"]), len(history) - 1
        pick = max if self.maximize else min
        best = pick(range(len(history)), key=lambda r: history[r]["selection_score"])
        return [c for h in history[:best + 1] for c in h["added"]], best
