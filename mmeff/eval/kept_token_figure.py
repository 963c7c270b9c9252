"""A figure of kept-token maps: methods x budgets on one image and question.

Usage::

    python -m mmeff.eval.kept_token_figure --model tiny-llava --seed 7 \\
        --method random --method "fastv:layer=1" --method "entropyprune:layer=1" --budgets 192,128,64 \\
        --out docs/results/kept-tokens-tiny-llava.png

Each cell is the image with the dropped patches darkened (:mod:`mmeff.eval.kept_token_map`), titled with the
method's answer; the first column is the dense answer. A JSON next to the PNG holds the config, the library
versions, every answer and every kept index list.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch


def collect(model: Any, processor: Any, seed: int, methods: list[str], budgets: list[int],
            family: str = "colour") -> dict[str, Any]:
    """Answers and kept indices for every (method, budget) on scene ``seed``'s first ``family`` question."""
    from ..demo.vlm_compare import compare, scene_questions
    from .runner import with_budget

    image, qas = scene_questions(seed)
    qa = next((q for q in qas if q.family == family), qas[0])
    cells: list[dict[str, Any]] = []
    dense = None
    for spec in methods:
        for b in budgets:
            full = with_budget(spec + ("," if ":" in spec else ":") + f"budget={b}", b)
            r = compare(model, processor, image, qa.question, full, expected=qa.answer)
            dense = r.dense_answer
            cells.append({"method": spec, "budget": b, "spec": full, "answer": r.pruned_answer,
                          "correct": r.correct(r.pruned_answer), "map": r.kept_maps[0],
                          "kept_visual_index": r.report["kept_visual_index"][0],
                          "kept_after_layer": r.report["kept_after_layer_per_sample"][0],
                          "layer": r.report["layer"], "cut_layers": r.report.get("cut_layers", [r.report["layer"]]),
                          "kept_per_cut": [int(k[0]) for k in r.report.get("kept_per_cut_per_sample", [])]})
    return {"image": image, "question": qa.question, "answer": qa.answer, "dense_answer": dense, "cells": cells}


def _short(text: str, n: int = 28) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def _kept_label(cell: dict[str, Any]) -> str:
    """"keeps N from layer K" for one cut; "keeps a/b/c at layers 0/4/8" for a chain (the map shows the last)."""
    layers, kept = cell.get("cut_layers") or [cell["layer"]], cell.get("kept_per_cut") or []
    if len(layers) > 1 and len(kept) == len(layers):
        return f"keeps {'/'.join(map(str, kept))} at layers {'/'.join(map(str, layers))}"
    return f"keeps {cell['kept_after_layer']} from layer {cell['layer']}"


def draw(result: dict[str, Any], methods: list[str], budgets: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save_figure

    rows, cols = len(methods), len(budgets) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.8 * rows + 0.6), squeeze=False)
    by_key = {(c["method"], c["budget"]): c for c in result["cells"]}
    for i, spec in enumerate(methods):
        axes[i][0].imshow(result["image"])
        axes[i][0].set_title(f"dense: {result['dense_answer']}", fontsize=8)
        axes[i][0].set_ylabel(spec, fontsize=8)
        for j, b in enumerate(budgets, start=1):
            c = by_key[(spec, b)]
            axes[i][j].imshow(c["map"])
            mark = "" if c["correct"] is None else (" (ok)" if c["correct"] else " (wrong)")
            axes[i][j].set_title(f"budget {b}: {_kept_label(c)}\n{_short(c['answer'])}{mark}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}\nQ: {result['question']}  (true: {result['answer']})", fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-llava")
    p.add_argument("--seed", type=int, default=7, help="shapes-world scene seed")
    p.add_argument("--family", default="colour", help="question family to ask (colour, count, position, ...)")
    p.add_argument("--method", action="append", default=[], help="method spec without budget (repeatable)")
    p.add_argument("--budgets", default="192,128,64")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/kept-tokens.png")
    args = p.parse_args(argv)
    from ..demo.vlm_compare import load_model
    from .report import versions

    torch.set_num_threads(args.threads)
    methods = args.method or ["random", "fastv", "entropyprune"]
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    model, processor = load_model(args.model)
    result = collect(model, processor, args.seed, methods, budgets, args.family)
    out = Path(args.out)
    draw(result, methods, budgets, out, f"{args.model}: kept visual tokens (dropped ones darkened)")
    doc = {"format": "mmeff.kept_tokens/1",
           "config": {"model": args.model, "seed": args.seed, "family": args.family, "methods": methods,
                      "budgets": budgets},
           "versions": versions(),
           "question": result["question"], "answer": result["answer"], "dense_answer": result["dense_answer"],
           "cells": [{k: v for k, v in c.items() if k != "map"} for c in result["cells"]], "png": str(out)}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
