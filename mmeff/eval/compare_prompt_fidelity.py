"""Paired per-video differences between two ``video_prompt_fidelity`` results on the same prompts and seeds.

Two models (or two sampling settings) scored on the same held-out prompts differ by far less than the spread
between prompts, so their pooled rates alone cannot say whether a change is real. Here every video is scored on
its own (shape existence: the share of the VLM's answers that are right over the checked frames; colours: the
share of checked frames with every colour present; persist / move: the share of its objects), and the mean
per-video difference is reported with its paired t statistic.

``python -m mmeff.eval.compare_prompt_fidelity new.json old.json [--out diff.json]``
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path
from typing import Any

from .guidance_eval import paired_differences

MEASURES = ("shape_existence", "all_colours", "persist", "move_as_named")


def load(path: Path) -> dict[str, Any]:
    """A result JSON, plain or gzipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def per_video(result: dict[str, Any]) -> dict[str, list[float | None]]:
    """Each measure per video of the generated set; ``None`` where a video has nothing to score."""
    gen = result["generated"]
    n = len(result["prompts"])
    frames = sorted(gen["vlm"], key=int)
    out: dict[str, list[float | None]] = {m: [] for m in MEASURES}
    for i in range(n):
        answers = [ok for f in frames for ok in gen["vlm"][f][i]["correct"].values()]
        out["shape_existence"].append(_mean([float(a) for a in answers]) if answers else None)
        out["all_colours"].append(_mean([float(gen["colours"][f][i]["all_colours_ok"]) for f in frames]))
        objects = gen["motion"][i]["objects"]
        out["persist"].append(_mean([float(o["persists"]) for o in objects]) if objects else None)
        out["move_as_named"].append(_mean([float(o["moves_as_named"]) for o in objects]) if objects else None)
    return out


def paired(new: dict[str, Any], old: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Mean per-video difference ``new - old``, its standard error and paired t
    (:func:`mmeff.eval.guidance_eval.paired_differences`) and both means, per measure."""
    if new["prompts"] != old["prompts"] or new.get("seeds") != old.get("seeds"):
        raise SystemExit("the two results were not run on the same prompts and seeds; rerun one with the other's "
                         "--n / --offset / --split")
    a, b = per_video(new), per_video(old)
    rows = {}
    for m in MEASURES:
        pairs = [(x, y) for x, y in zip(a[m], b[m]) if x is not None and y is not None]
        xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
        stats = paired_differences({m: xs}, {m: ys})[m]
        rows[m] = {"diff": stats["mean"], "se": stats["se"], "t": stats["t"], "n": len(pairs),
                   "new": _mean(xs), "old": _mean(ys)}
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("new", type=Path)
    ap.add_argument("old", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="also write the table as JSON")
    a = ap.parse_args(argv)
    rows = paired(load(a.new), load(a.old))
    print(f"{'per video':<16} {'new':>7} {'old':>7} {'new-old':>8} {'t':>6}  n")
    for m, r in rows.items():
        print(f"{m:<16} {r['new']:7.3f} {r['old']:7.3f} {r['diff']:+8.3f} {r['t']:6.2f}  {r['n']}")
    if a.out is not None:
        a.out.write_text(json.dumps({"new": str(a.new), "old": str(a.old), "paired": rows}, indent=1))


if __name__ == "__main__":
    main()
