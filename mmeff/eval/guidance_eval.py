"""Compare CFG, CFG + PAG and CFG + SoftPAG on HeadHunter-found heads, on the tiny SD3 shapes-world model.

``python -m mmeff.eval.guidance_eval --out runs/guidance.json`` (defaults: 16 test prompts, 10 steps):

1. **Search** (HeadHunter, arXiv 2506.10978 Alg. 1): greedy rounds over every (layer, head) of the
   transformer on *val*-split prompts/seeds (disjoint from the test scenes), objective (``--objective``) = the
   tiny CLIP judge's ``clip`` score (100 x cos), its object ``presence`` accuracy, ``clip+presence``
   (clip / 100 + presence), or ``vlm``: the zoo VLM's shape-existence accuracy against the prompt's scene (needs
   ``--vlm``; the judge reads world prompts only, and its presence head scores 0.375 on layout renders), higher
   is better; SoftPAG with ``--search-u`` and CFG on (so the heads are chosen
   for the setting they are deployed in). ``--keep best`` (default) deploys the heads after the round whose
   composed selection scored best on the search set. The search state is saved next to the output and resumes.
2. **Evaluation** on ``--n-test`` *test*-split scenes (generator seed = scene seed), same seeds for every
   method. Scenes and prompts are of the pipeline's prompt family (:mod:`mmeff.zoo.prompt_family`): a layout
   tiny-sd3 draws layout prompts, which name each object's cell. The judge was trained on world prompts, so it
   always scores the scene's ``make_prompt`` (the same objects without positions):

   - ``cfg``: the stock pipeline, ``guidance_scale=--cfg`` (every other row adds a perturbed branch to it);
   - ``cfg+pag``: diffusers' PAG, ``SoftPAG(layers=(1,), u=1, mode="image_identity")``: every head of block 1
     (diffusers' default ``pag_applied_layers=["blocks.1"]``), image queries attend only to themselves while
     text keys stay visible, ``scale=--pag-scale``; it equals diffusers' StableDiffusion3PAGPipeline
     (``tests/dit/test_pag_oracle.py``, on a random and on the zoo pipeline);
   - ``cfg+pag-joint``: the same layer and scale with ``mode="joint_identity"`` (identity over the whole joint
     text + image sequence, HeadHunter's perturbation): *not* diffusers' PAG;
   - ``cfg+softpag``: SoftPAG + HeadHunter: ``SoftPAG(heads=<found>, u=--u, mode=--softpag-mode)``, same scale;
     the search perturbs the candidate heads the same way. ``joint_identity`` (default) is HeadHunter's own
     perturbation, ``image_identity`` diffusers' PAG rule on single heads.

   Each row's ``runs`` field in the JSON says this in words. Metrics: mean judge CLIP score (100 x cos),
   object-presence accuracy (GenEval-style fraction of requested colour-shape objects detected by the judge's
   presence head, against the scene's object list), with ``--vlm`` the zoo VLM's shape-existence accuracy and
   the pixel colour check of :mod:`mmeff.eval.t2i_fidelity`, and wall-clock seconds per image (batched calls,
   after a warm-up call). Every metric is also given as a paired difference against ``cfg`` (same prompts and
   seeds), with its standard error and t.

Writes the JSON (config, versions, search history, per-method table and per-prompt scores) and
``<out stem>_grid.png`` (rows = methods plus the real renders, columns = prompts; images upscaled x4) in the output folder.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

METHODS = ("cfg", "cfg+pag", "cfg+pag-joint", "cfg+softpag")
RUNS = {
    "cfg": "CFG only (stock pipeline)",
    "cfg+pag": "CFG + diffusers PAG: SoftPAG(layers=(1,), u=1, mode='image_identity') on all heads of blocks.1 "
               "(= StableDiffusion3PAGPipeline, pag_applied_layers=['blocks.1'])",
    "cfg+pag-joint": "CFG + joint-identity PAG: SoftPAG(layers=(1,), u=1, mode='joint_identity') on all heads of "
                     "blocks.1 (text tokens perturbed too; not diffusers' PAG)",
    "cfg+softpag": "CFG + SoftPAG on HeadHunter's heads: SoftPAG(heads=<found>, u, mode=<softpag_mode>)",
}
"""What each row of the comparison runs, in words (written into the JSON next to the numbers)."""
OBJECTIVES = ("clip", "presence", "clip+presence", "vlm")


def vlm_objective(vlm: tuple[Any, Any], scene_of_prompt: dict[str, Any]) -> Any:
    """HeadHunter objective: per image, the zoo VLM's accuracy on the six shape-existence questions of the scene
    its prompt describes (:func:`mmeff.eval.t2i_fidelity.vlm_existence`). Unlike the judge, which reads world
    prompts only, it scores what a layout image shows against the scene."""
    from .t2i_fidelity import vlm_existence

    def objective(images: Any, prompts: list[str]) -> list[float]:
        rows = vlm_existence(*vlm, list(images), [scene_of_prompt[p] for p in prompts])
        return [float(np.mean(list(r["correct"].values()))) for r in rows]

    objective.__name__ = "vlm.shape_existence"
    return objective


def make_objective(judge: Any, name: str) -> Any:
    """HeadHunter objective ``fn(images, prompts) -> list[float]`` from the tiny judge (higher is better)."""
    if name not in OBJECTIVES or name == "vlm":
        raise ValueError(f"judge objective must be one of {OBJECTIVES[:3]}, got {name!r}")

    def objective(images: Any, prompts: list[str]) -> list[float]:
        clip = judge.clip_score(images, prompts) if "clip" in name else None
        pres = judge.object_presence(images, prompts) if "presence" in name else None
        if clip is None:
            return pres
        if pres is None:
            return clip
        return [c / 100.0 + p for c, p in zip(clip, pres)]

    objective.__name__ = f"judge.{name}"
    return objective


def judged_on(objective: Any, judge_texts: dict[str, str]) -> Any:
    """``objective`` scoring the judge's text for each generation prompt (``judge_texts``; unknown prompts are
    scored as they are). The judge reads world prompts, not layout prompts' position words."""

    def wrapped(images: Any, prompts: list[str]) -> list[float]:
        return objective(images, [judge_texts.get(p, p) for p in prompts])

    wrapped.__name__ = getattr(objective, "__name__", "objective")
    return wrapped


def paired_differences(method: dict[str, list[float]], base: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Mean per-prompt difference (method - base) of every metric, its standard error and t = mean / se
    (same prompts and seeds on both sides, so the pairing removes the prompt-to-prompt spread)."""
    out = {}
    for key, values in method.items():
        d = np.asarray(values, dtype=np.float64) - np.asarray(base[key], dtype=np.float64)
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
        out[key] = {"mean": float(d.mean()), "se": se, "t": float(d.mean() / se) if se and se > 0 else float("nan")}
    return out


def scenes_of(split: str, n: int, offset: int = 0, family: str = "world") -> list[Any]:
    from ..zoo.prompt_family import held_out_scenes

    return held_out_scenes(family, split, n, offset)


def generate(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], config: Any, call_kwargs: dict[str, Any],
             batch_size: int = 8) -> tuple[list[np.ndarray], float]:
    """Images (HWC float arrays in [0, 1]) and seconds per image."""
    import mmeff

    images: list[np.ndarray] = []
    elapsed = 0.0
    for i in range(0, len(prompts), batch_size):
        ps = list(prompts[i:i + batch_size])
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        t0 = time.perf_counter()
        if config is None:
            out = pipe(prompt=ps, generator=gens, output_type="np", **call_kwargs)
        else:
            with mmeff.apply(pipe, config):
                out = pipe(prompt=ps, generator=gens, output_type="np", **call_kwargs)
        elapsed += time.perf_counter() - t0
        images.extend(list(out.images))
    return images, elapsed / max(1, len(prompts))


def save_grid(path: Path, rows: dict[str, list[np.ndarray]], titles: Sequence[str] | None = None,
              scale: int = 4) -> Path:
    """Rows = methods, columns = prompts; method names in a left margin, column numbers on top."""
    from PIL import Image, ImageDraw

    names = list(rows)
    ncol = max(len(v) for v in rows.values())
    h, w = rows[names[0]][0].shape[:2]
    cell_h, cell_w = h * scale, w * scale
    margin, top, pad = 96, 14, 2
    grid = Image.new("RGB", (margin + ncol * (cell_w + pad), top + len(names) * (cell_h + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j in range(ncol):
        draw.text((margin + j * (cell_w + pad) + 2, 1), str(j), fill=(0, 0, 0))
    for r, name in enumerate(names):
        y = top + r * (cell_h + pad)
        draw.text((3, y + cell_h // 2 - 5), name, fill=(0, 0, 0))
        for j, im in enumerate(rows[name]):
            arr = (np.clip(im, 0, 1) * 255).round().astype(np.uint8)
            tile = Image.fromarray(arr).resize((cell_w, cell_h), Image.NEAREST)
            grid.paste(tile, (margin + j * (cell_w + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def versions() -> dict[str, str]:
    import diffusers
    import transformers

    import mmeff

    out = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "mmeff": mmeff.__version__}
    try:
        import open_clip

        out["open_clip"] = open_clip.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def run(out: str | Path, *, model: str = "tiny-sd3", pipe: Any = None, judge: Any = None, n_test: int = 16,
        steps: int = 10, cfg: float = 4.0, pag_scale: float = 3.0, u: float = 1.0, search_u: float = 1.0,
        search_prompts: int = 8, rounds: int = 2, top_k: int = 2, candidates: Any = "heads",
        heads: str | None = None, batch_size: int = 8, threads: int | None = 1,
        progress: bool = False, objective: str = "clip", keep: str = "best", vlm: Any = None,
        softpag_mode: str = "joint_identity") -> dict[str, Any]:
    """Search heads (unless ``heads``), then evaluate every row of :data:`METHODS` on the test prompts.
    ``vlm`` = ``(model, processor)`` adds the VLM's shape existence and the pixel colour check."""
    from ..guidance import HeadHunter, SoftPAG
    from ..zoo.judge import Judge
    from ..zoo.load_pipeline import load_pipeline
    from ..zoo.prompt_family import pipeline_family, prompt_of
    from ..zoo.world import make_prompt
    from .t2i_fidelity import colour_checks, pipe_call_kwargs, vlm_existence

    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pipe = pipe if pipe is not None else load_pipeline(model)
    judge = judge if judge is not None else Judge.load()
    call = {**pipe_call_kwargs(pipe), "num_inference_steps": steps, "guidance_scale": cfg}
    family = pipeline_family(pipe)
    val, test = scenes_of("val", search_prompts, family=family), scenes_of("test", n_test, family=family)
    judge_texts = {prompt_of(family, s): make_prompt(s) for s in [*val, *test]}
    if objective == "vlm":
        if vlm is None:
            from ..core.errors import ConfigError

            raise ConfigError("guidance_eval: --objective vlm needs --vlm (e.g. tiny-qwen2-vl)")
        score = vlm_objective(vlm, {prompt_of(family, s): s for s in [*val, *test]})
    else:
        score = judged_on(make_objective(judge, objective), judge_texts)
    t_start = time.time()

    # ---- 1. head search on val prompts (or given heads)
    search: dict[str, Any] = {}
    if heads:
        found = heads
        search = {"skipped": True, "heads": heads}
    else:
        sprompts, sseeds = [prompt_of(family, s) for s in val], [s.seed for s in val]

        state = out.with_name(out.stem + "_headhunter_state.json")
        t0 = time.time()
        hh = HeadHunter(pipe, score, sprompts, sseeds, rounds=rounds, top_k=top_k,
                        candidates=candidates,
                        u=search_u, scale=pag_scale, mode=softpag_mode, call_kwargs={**call, "output_type": "np"}, state_path=state,
                        batch_size=batch_size, progress=progress, keep=keep)
        res = hh.run()
        found = ";".join(f"{l}.{h}" for l, h in res.heads)
        preset = res.save_preset(out.with_name(out.stem + "_heads.json"))
        search = {"split": "val", "n_prompts": len(sprompts), "seeds": sseeds, "rounds": rounds, "top_k": top_k,
                  "u": search_u, "scale": pag_scale, "mode": softpag_mode, "objective": score.__name__, "cfg": cfg, "steps": steps,
                  "baseline_cfg_only": res.baseline, "keep": keep, "kept_round": res.meta["kept_round"],
                  "n_candidates": len(hh.pool), "evaluations": hh.evaluations, "seconds": round(time.time() - t0, 1),
                  "heads": res.candidates, "history": res.history, "state": str(state), "preset": str(preset)}

    # ---- 2. evaluation on test prompts
    runs = {**RUNS, "cfg+softpag": RUNS["cfg+softpag"].replace("<softpag_mode>", repr(softpag_mode))}
    prompts, seeds = [prompt_of(family, s) for s in test], [s.seed for s in test]
    judged = [judge_texts[p] for p in prompts]
    configs = {"cfg": None, "cfg+pag": SoftPAG(layers=(1,), u=1.0, scale=pag_scale, mode="image_identity"),
               "cfg+pag-joint": SoftPAG(layers=(1,), u=1.0, scale=pag_scale, mode="joint_identity"),
               "cfg+softpag": SoftPAG(heads=found, u=u, scale=pag_scale, mode=softpag_mode)}
    generate(pipe, prompts[:1], seeds[:1], None, call, 1)  # warm-up
    results: dict[str, Any] = {}
    rows: dict[str, list[np.ndarray]] = {}
    for name, conf in configs.items():
        images, spi = generate(pipe, prompts, seeds, conf, call, batch_size)
        cs = judge.clip_score(images, judged)
        pres = judge.object_presence(images, test)
        objective_scores = [float(x) for x in score(images, prompts)]
        rows[name] = images
        per_prompt = {"clip_score": cs, "presence": pres, "objective": objective_scores}
        if vlm is not None:
            per_prompt["shape_existence"] = [float(np.mean(list(r["correct"].values())))
                                             for r in vlm_existence(*vlm, images, test)]
            per_prompt["all_colours_ok"] = [float(colour_checks(im, sc)["all_colours_ok"])
                                            for im, sc in zip(images, test)]
        results[name] = {"runs": runs[name], "clip_score": float(np.mean(cs)), "clip_score_std": float(np.std(cs)),
                         "presence_acc": float(np.mean(pres)), "sec_per_image": spi,
                         "objective": float(np.mean(objective_scores)),
                         **{k: float(np.mean(per_prompt[k])) for k in ("shape_existence", "all_colours_ok")
                            if k in per_prompt},
                         "config": None if conf is None else conf.to_dict() if hasattr(conf, "to_dict") else repr(conf),
                         "per_prompt": per_prompt}
    for name, row in results.items():
        if name != "cfg":
            row["vs_cfg"] = paired_differences(row["per_prompt"], results["cfg"]["per_prompt"])
    # reference: the judge on the real renders of the test scenes (upper bound of the metrics)
    from ..zoo.world import render

    real = [render(s, size=call["height"]) for s in test]
    reference = {"clip_score": float(np.mean(judge.clip_score(real, judged))),
                 "presence_acc": float(np.mean(judge.object_presence(real, test)))}
    if vlm is not None:
        reference["shape_existence"] = float(np.mean([c for r in vlm_existence(*vlm, real, test)
                                                      for c in r["correct"].values()]))
        reference["all_colours_ok"] = float(np.mean([colour_checks(im, sc)["all_colours_ok"]
                                                     for im, sc in zip(real, test)]))
    rows["real render"] = [np.asarray(im, dtype=np.float32) / 255.0 for im in real]
    grid = save_grid(out.with_name(out.stem + "_grid.png"), rows)
    sd3_info = getattr(pipe, "_mmeff_training", None)
    if sd3_info is None and model == "tiny-sd3":
        f = Path(__file__).resolve().parents[1] / "zoo" / "models" / "tiny-sd3" / "training.json"
        sd3_info = json.loads(f.read_text()) if f.is_file() else None
    report = {
        "format": "mmeff.guidance_eval/1",
        "config": {"model": model, "n_test": n_test, "prompt_family": family, "objective": score.__name__, "test_split": "test",
                   "steps": steps, "cfg": cfg,
                   "pag_scale": pag_scale, "u": u,
                   "mode": {"cfg+pag": "image_identity", "cfg+pag-joint": "joint_identity",
                            "cfg+softpag": softpag_mode},
                   "runs": runs, "batch_size": batch_size,
                   "vlm": None if vlm is None else type(vlm[0]).__name__,
                   "threads": torch.get_num_threads(), "call_kwargs": call,
                   "pag_definition": "SoftPAG(layers=(1,), u=1, mode=image_identity): all heads of block 1, "
                                     "diffusers' StableDiffusion3PAGPipeline rule and default layer 'blocks.1'"},
        "versions": versions(),
        "found_heads": found,
        "search": search,
        "results": results,
        "reference_real_renders": reference,
        "prompts": prompts, "seeds": seeds, "judge_prompts": judged,
        "grid": str(grid),
        "sd3_trained": bool(sd3_info and sd3_info.get("trained")),
        "judge_trained": bool(getattr(judge, "trained", False)),
        "seconds_total": round(time.time() - t_start, 1),
    }
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def table(report: dict[str, Any]) -> str:
    obj = report["config"].get("objective", "objective")
    first = next(iter(report["results"].values()))
    extra = [k for k in ("shape_existence", "all_colours_ok") if k in first]
    lines = ["| method | CLIP score | presence acc | " + "".join(f"{k} | " for k in extra)
             + f"{obj} | {obj} vs CFG (paired, t) | presence vs CFG (paired, t) | s/image | runs |",
             "|---|---|---|" + "---|" * len(extra) + "---|---|---|---|---|"]

    def paired(r: dict[str, Any], key: str) -> str:
        d = r.get("vs_cfg", {}).get(key)
        return "-" if d is None else f"{d['mean']:+.3f} (t={d['t']:.1f})"

    for name, r in report["results"].items():
        lines.append(f"| {name} | {r['clip_score']:.2f} | {r['presence_acc']:.3f} | "
                     + "".join(f"{r[k]:.3f} ({paired(r, k)}) | " for k in extra)
                     + f"{r.get('objective', float('nan')):.3f} | {paired(r, 'objective')} | {paired(r, 'presence')} "
                     f"| {r['sec_per_image']:.4f} | {r.get('runs', '')} |")
    ref = report["reference_real_renders"]
    lines.append(f"| (real renders) | {ref['clip_score']:.2f} | {ref['presence_acc']:.3f} | "
                 + "".join(f"{ref.get(k, float('nan')):.3f} | " for k in extra) + "- | - | - | - | world's render |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/guidance.json"))
    ap.add_argument("--model", default="tiny-sd3")
    ap.add_argument("--n-test", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--pag-scale", type=float, default=3.0)
    ap.add_argument("--u", type=float, default=1.0, help="SoftPAG strength for the found heads at evaluation")
    ap.add_argument("--search-u", type=float, default=1.0)
    ap.add_argument("--search-prompts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--candidates", default="heads", help="'heads', 'layers' or a comma list like 0.1,2.3")
    ap.add_argument("--heads", default=None, help="skip the search and use these heads ('l.h;l.h')")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--objective", choices=OBJECTIVES, default="clip", help="HeadHunter's search objective")
    ap.add_argument("--vlm", default=None, help="zoo VLM for shape existence (e.g. tiny-qwen2-vl); off by default")
    ap.add_argument("--softpag-mode", choices=("joint_identity", "image_identity"), default="joint_identity",
                    help="how SoftPAG perturbs the searched heads (HeadHunter's joint identity, or diffusers' image "
                         "identity)")
    ap.add_argument("--keep", choices=("best", "last"), default="best",
                    help="the heads after the best-scoring search round (validated) or after the last one (Alg. 1)")
    a = ap.parse_args(argv)
    from ..zoo.load import load

    cands: Any = a.candidates if a.candidates in ("heads", "layers") else [c for c in a.candidates.split(",") if c]
    rep = run(a.out, model=a.model, n_test=a.n_test, steps=a.steps, cfg=a.cfg, pag_scale=a.pag_scale, u=a.u,
              search_u=a.search_u, search_prompts=a.search_prompts, rounds=a.rounds, top_k=a.top_k,
              candidates=cands, heads=a.heads, batch_size=a.batch_size, threads=a.threads, progress=a.progress,
              objective=a.objective, keep=a.keep, vlm=None if a.vlm is None else load(a.vlm),
              softpag_mode=a.softpag_mode)
    print(table(rep))
    print(f"found heads: {rep['found_heads']}")
    print(f"wrote {a.out} and {rep['grid']}")


if __name__ == "__main__":
    main()
