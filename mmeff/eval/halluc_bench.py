"""Hallucination bench: captions and POPE questions on weak-evidence scenes, dense vs mitigated.

Usage::

    python -m mmeff.eval.halluc_bench --model tiny-llava --n 500 \
        --methods dense vhr gift "entropyprune:budget=64+vhr" --out docs/results/halluc-tiny-llava.json

Per scene (:func:`mmeff.zoo.world.weak.weak_scene`, held-out test seeds): one caption ("Describe the image.",
greedy, ``caption_tokens`` tokens) scored with CHAIR, and two POPE-adversarial questions (an absent biased
partner of a present trigger -> "no", a present shape -> "yes"). Every method runs the same scenes, so
differences are paired: CHAIR_s and POPE accuracy get an exact sign (McNemar) test against dense.
Results are appended per scene to ``<out>.<method>.jsonl`` and a rerun resumes from it. Scenes run ``--batch``
at a time (captions in one left-padded ``generate``, their POPE questions in another); per-scene results equal
batch 1, and per-scene seconds are the batch's seconds divided by its size.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..zoo.world import chair_scores, hallucinated, make_caption
from ..zoo.world.questions import CAPTION_PROMPT
from ..zoo.world.weak import WeakKnobs, absent_partners, render_weak, weak_scene, weak_seeds


def pope_pairs(scene: Any) -> list[tuple[str, str]]:
    """(question, answer) pairs: one absent biased partner ("no") and one present shape ("yes")."""
    neg = absent_partners(scene)[0]
    pos = sorted(scene.shapes())[scene.seed % len(scene.shapes())]
    return [(f"Is there a {neg} in the image?", "no"), (f"Is there a {pos} in the image?", "yes")]


@torch.inference_mode()
def generate(model: Any, processor: Any, images: Sequence[Any], questions: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy answers for (image, question) pairs, one left-padded batch."""
    from ..zoo.eval_dense import answer

    return answer(model, processor, images, questions, max_new_tokens=max_new_tokens)


def run_scene(model: Any, processor: Any, seed: int, knobs: WeakKnobs, caption_tokens: int) -> dict[str, Any]:
    """Caption + POPE answers of one scene, with the seconds they took."""
    return run_scenes(model, processor, [seed], knobs, caption_tokens)[0]


def run_scenes(model: Any, processor: Any, seeds: Sequence[int], knobs: WeakKnobs,
               caption_tokens: int) -> list[dict[str, Any]]:
    """Captions + POPE answers of several scenes: all captions in one left-padded ``generate``, all their POPE
    questions in another. Each row is what the scene gives alone (the hosts keep batch == single); the batch's
    seconds are shared equally among its scenes (``caption_seconds`` / ``pope_seconds`` per scene)."""
    scenes = [weak_scene(seed, knobs) for seed in seeds]
    images = [render_weak(scene, knobs) for scene in scenes]
    t0 = time.perf_counter()
    captions = generate(model, processor, images, [CAPTION_PROMPT] * len(images), caption_tokens)
    t1 = time.perf_counter()
    pairs = [pope_pairs(scene) for scene in scenes]
    flat = [(image, q) for image, scene_pairs in zip(images, pairs) for q, _ in scene_pairs]
    answers = iter(generate(model, processor, [i for i, _ in flat], [q for _, q in flat], 4))
    t2 = time.perf_counter()
    n = len(seeds)
    rows = []
    for seed, scene, caption, scene_pairs in zip(seeds, scenes, captions, pairs):
        rows.append({"seed": seed, "caption": caption,
                     "hallucinated": [m.shape + (f"/{m.colour}" if m.colour else "") for m in hallucinated(caption, scene)],
                     "pope": [{"q": q, "answer": a, "pred": next(answers).strip().lower().rstrip(".")}
                              for q, a in scene_pairs],
                     "caption_seconds": (t1 - t0) / n, "pope_seconds": (t2 - t1) / n, "batch": n})
    return rows


def summarise(rows: list[dict[str, Any]], knobs: WeakKnobs) -> dict[str, Any]:
    """CHAIR_s / CHAIR_i / recall / caption length and POPE accuracy / F1 / yes-rate of per-scene rows."""
    scenes = [weak_scene(r["seed"], knobs) for r in rows]
    chair = chair_scores([r["caption"] for r in rows], scenes)
    qa = [p for r in rows for p in r["pope"]]
    tp = sum(p["pred"] == "yes" and p["answer"] == "yes" for p in qa)
    fp = sum(p["pred"] == "yes" and p["answer"] == "no" for p in qa)
    fn = sum(p["pred"] != "yes" and p["answer"] == "yes" for p in qa)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {
        "n_scenes": len(rows),
        "chair_s": chair["chair_s"], "chair_i": chair["chair_i"], "recall": chair["recall"],
        "caption_words": sum(len(r["caption"].split()) for r in rows) / max(1, len(rows)),
        "mentions_per_caption": chair["n_mentions"] / max(1, len(rows)),
        "pope_accuracy": sum(p["pred"] == p["answer"] for p in qa) / max(1, len(qa)),
        "pope_f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
        "pope_yes_rate": sum(p["pred"] == "yes" for p in qa) / max(1, len(qa)),
        "seconds_per_scene": sum(r["caption_seconds"] + r["pope_seconds"] for r in rows) / max(1, len(rows)),
        "caption_seconds_per_scene": sum(r["caption_seconds"] for r in rows) / max(1, len(rows)),
    }


def sign_test(a: Sequence[bool], b: Sequence[bool], base: str = "dense") -> dict[str, Any]:
    """Exact two-sided McNemar (sign) test on paired binary outcomes: only discordant pairs count."""
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n = only_a + only_b
    k = min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return {f"only_{base}": only_a, "only_method": only_b, "p_value": p}


def paired(dense: list[dict[str, Any]], other: list[dict[str, Any]], base: str = "dense") -> dict[str, Any]:
    """Paired tests of a method against dense (or another ``base`` run) on the scenes both ran."""
    by_seed = {r["seed"]: r for r in other}
    pairs = [(d, by_seed[d["seed"]]) for d in dense if d["seed"] in by_seed]
    return {
        "n_pairs": len(pairs),
        "chair_s_hallucinated_caption": sign_test([bool(d["hallucinated"]) for d, _ in pairs],
                                                  [bool(o["hallucinated"]) for _, o in pairs], base),
        "pope_correct": sign_test([p["pred"] == p["answer"] for d, _ in pairs for p in d["pope"]],
                                  [p["pred"] == p["answer"] for _, o in pairs for p in o["pope"]], base),
    }


@torch.inference_mode()
def latency(model: Any, processor: Any, methods: Sequence[str], seeds: Sequence[int], knobs: WeakKnobs,
            new_tokens: int = 32) -> dict[str, Any]:
    """Seconds per caption at a *fixed* number of new tokens, methods interleaved scene by scene.

    Fixed length (``min_new_tokens = max_new_tokens``) so a method that talks longer is not charged for it,
    and interleaving so every method sees the same load on a shared machine. Returns per method the median
    seconds and the median of its per-scene ratio to dense.
    """
    import statistics

    import mmeff

    from ..zoo.processors import chat

    text = processor.apply_chat_template(chat(CAPTION_PROMPT), add_generation_prompt=True)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for seed in seeds:
        inputs = processor(images=[render_weak(weak_scene(seed, knobs), knobs)], text=[text], return_tensors="pt")
        for method in methods:
            handle = None if method == "dense" else mmeff.apply(model, *method.split("+"))
            try:
                model.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up
                t0 = time.perf_counter()
                model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                times[method].append(time.perf_counter() - t0)
            finally:
                if handle is not None:
                    handle.remove()
    out: dict[str, Any] = {"new_tokens": new_tokens, "n_scenes": len(seeds), "methods": {}}
    for m, ts in times.items():
        entry: dict[str, Any] = {"median_seconds": statistics.median(ts)}
        if "dense" in times and m != "dense":
            entry["median_ratio_to_dense"] = statistics.median(t / d for t, d in zip(ts, times["dense"]))
        out["methods"][m] = entry
    return out


def _load_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_method(model: Any, processor: Any, method: str, seeds: Sequence[int], knobs: WeakKnobs,
               caption_tokens: int, log: Path, batch: int = 1) -> list[dict[str, Any]]:
    """Rows of ``method`` ("dense" or a spec, pruner+mitigator joined by '+') over ``seeds``, resuming from ``log``.

    The scenes still to run go ``batch`` at a time (:func:`run_scenes`); each finished batch is appended to the log.
    """
    import mmeff

    rows = [r for r in _load_rows(log) if r["seed"] in set(seeds)]
    done = {r["seed"] for r in rows}
    todo = [s for s in seeds if s not in done]
    handle = None if method == "dense" else mmeff.apply(model, *method.split("+"))
    try:
        with log.open("a") as f:
            for start in range(0, len(todo), max(1, batch)):
                new = run_scenes(model, processor, todo[start:start + max(1, batch)], knobs, caption_tokens)
                rows.extend(new)
                for row in new:
                    f.write(json.dumps(row) + "\n")
                f.flush()
                if (len(rows) // 50) != ((len(rows) - len(new)) // 50):
                    print(f"  {method}: {len(rows)}/{len(seeds)}", flush=True)
    finally:
        if handle is not None:
            handle.remove()
    order = {s: i for i, s in enumerate(seeds)}
    return sorted(rows, key=lambda r: order[r["seed"]])


def main(argv: list[str] | None = None) -> int:
    from ..eval.report import versions
    from ..zoo.load import load

    p = argparse.ArgumentParser(prog="python -m mmeff.eval.halluc_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llava")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed-offset", type=int, default=0,
                   help="start this far into the weak seeds (tuning uses 10000: disjoint from the bench's scenes)")
    p.add_argument("--methods", nargs="+", default=["dense"])
    p.add_argument("--caption-tokens", type=int, default=96)
    p.add_argument("--contrast", type=float, default=WeakKnobs.contrast)
    p.add_argument("--noise", type=float, default=WeakKnobs.noise)
    p.add_argument("--occlude", type=float, default=WeakKnobs.occlude)
    p.add_argument("--small-prob", type=float, default=WeakKnobs.small_prob)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=8,
                   help="scenes captioned in one left-padded generate call (their POPE questions in another); each "
                        "scene's result is the same as at batch 1, its seconds are the batch's divided by the batch size")
    p.add_argument("--out", required=True)
    p.add_argument("--latency", type=int, default=0, metavar="N",
                   help="also time the methods at a fixed caption length on N scenes, interleaved")
    p.add_argument("--logs", nargs="*", default=None, metavar="METHOD=JSONL",
                   help="summarise finished per-method logs instead of running (scenes common to all of them)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    knobs = WeakKnobs(contrast=args.contrast, noise=args.noise, occlude=args.occlude, small_prob=args.small_prob)
    model, processor = load(args.model)
    seeds = list(weak_seeds(args.n, args.seed_offset))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"model": args.model, "config": {**vars(args), "knobs": knobs.__dict__},
                               "versions": versions(), "methods": {}}
    rows_by_method: dict[str, list[dict[str, Any]]] = {}
    given = dict(item.rsplit("=", 1) for item in args.logs) if args.logs is not None else {}
    if given:  # summarise: the scenes every log has, in seed order
        logged = {m: {r["seed"]: r for r in _load_rows(Path(f))} for m, f in given.items()}
        seeds = [s for s in seeds if all(s in rows for rows in logged.values())]
        results["config"]["n_common_scenes"] = len(seeds)
    for method in (list(given) if given else args.methods):
        log = out.with_suffix(f".{method.replace(':', '_').replace('=', '').replace(',', '_').replace('+', '__')}.jsonl")
        if given:
            rows = [logged[method][s] for s in seeds]
        else:
            rows = run_method(model, processor, method, seeds, knobs, args.caption_tokens, log, args.batch)
        rows_by_method[method] = rows
        results["methods"][method] = summarise(rows, knobs)
        if method != "dense" and "dense" in rows_by_method:
            dense = results["methods"]["dense"]
            res = results["methods"][method]
            res["vs_dense"] = {
                **paired(rows_by_method["dense"], rows),
                "chair_s_relative_change": (res["chair_s"] - dense["chair_s"]) / dense["chair_s"] if dense["chair_s"] else None,
                "recall_change_points": 100 * (res["recall"] - dense["recall"]),
                "pope_f1_change": res["pope_f1"] - dense["pope_f1"],
                "latency_ratio": res["seconds_per_scene"] / dense["seconds_per_scene"],
            }
        pruner = method.split("+")[0]
        if "+" in method and pruner in rows_by_method:  # the mitigator's own effect on the pruned model
            base, res = results["methods"][pruner], results["methods"][method]
            res["vs_pruner"] = {
                **paired(rows_by_method[pruner], rows, base="pruner"),
                "chair_s_relative_change": (res["chair_s"] - base["chair_s"]) / base["chair_s"] if base["chair_s"] else None,
                "recall_change_points": 100 * (res["recall"] - base["recall"]),
                "pope_f1_change": res["pope_f1"] - base["pope_f1"],
            }
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(method, json.dumps(results["methods"][method], indent=1), flush=True)
    if args.latency:
        results["latency_fixed_length"] = latency(model, processor, list(results["methods"]), seeds[: args.latency], knobs)
    results["examples"] = {m: [{"seed": r["seed"], "caption": r["caption"], "hallucinated": r["hallucinated"],
                                "reference": make_caption(weak_scene(r["seed"], knobs))} for r in rows[:5]]
                           for m, rows in rows_by_method.items()}
    out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
