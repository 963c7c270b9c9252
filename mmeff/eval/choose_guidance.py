"""Choose a video model's guidance scale from ``video_prompt_fidelity`` runs on the val prompts.

Each run is one guidance scale (``--cfg``) on the same val prompts and seeds. The rule: among the scales whose
shape existence is within ``--tolerance`` (0.01) of the best one's, take the one with the most videos whose
colours are all present. Shape existence is what the judge VLM sees, colours are what persistence and motion
build on; on tiny-wan, higher guidance first leaves shape existence flat and then only costs colours, while too
little guidance costs shape existence. The choice is made on val so the test prompts stay held out; the paired
per-video differences against the chosen scale show how clear the choice is.

``python -m mmeff.eval.choose_guidance runs/val_c*.json --out docs/results/<model>-cfg-val.json``
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .compare_prompt_fidelity import load, paired


def summary_row(result: dict[str, Any]) -> dict[str, float]:
    """The pooled measures of one run's generated videos."""
    s = result["generated"]["summary"]
    return {"shape_existence": s["shape_existence_acc"], "all_colours": s["all_colours_ok"],
            "first_frame_in_cell": s.get("first_frame_object_in_named_cell"),
            "persist": s["motion"]["object_persists"], "move_as_named": s["motion"]["object_moves_as_named"]}


def choose(results: list[dict[str, Any]], tolerance: float = 0.01) -> dict[str, Any]:
    """The chosen guidance scale, every scale's measures, and paired differences against the choice."""
    if len(results) < 2:
        raise SystemExit("give at least two runs at different --cfg to choose between")
    splits = {r["split"] for r in results}
    if splits != {"val"}:
        raise SystemExit(f"runs on split(s) {sorted(splits)}: choose on val prompts (video_prompt_fidelity "
                         "--split val) so the test prompts stay held out")
    by_cfg = {float(r["call_kwargs"]["guidance_scale"]): r for r in results}
    if len(by_cfg) != len(results):
        raise SystemExit("two runs have the same guidance scale; give one run per --cfg")
    steps = {r["call_kwargs"]["num_inference_steps"] for r in results}
    if len(steps) != 1:
        raise SystemExit(f"runs at different step counts {sorted(steps)}: compare guidance at one --steps")
    rows = {cfg: summary_row(r) for cfg, r in sorted(by_cfg.items())}
    best_existence = max(row["shape_existence"] for row in rows.values())
    eligible = [cfg for cfg, row in rows.items() if row["shape_existence"] >= best_existence - tolerance]
    chosen = max(eligible, key=lambda c: (rows[c]["all_colours"], rows[c]["shape_existence"]))
    return {"chosen_cfg": chosen, "rule": f"most all-colours among scales within {tolerance} of the best shape "
                                         "existence", "tolerance": tolerance,
            "steps": steps.pop(), "n_prompts": len(results[0]["prompts"]), "split": "val",
            "per_cfg": {str(c): row for c, row in rows.items()},
            "paired_against_chosen": {str(c): paired(by_cfg[c], by_cfg[chosen]) for c in rows if c != chosen},
            "versions": results[0].get("versions"), "model_training": results[0].get("pipe_training")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+", help="video_prompt_fidelity JSONs, one per --cfg, split val")
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    res = choose([load(p) for p in a.runs], a.tolerance)
    res["runs"] = [str(p) for p in a.runs]
    print(f"{'cfg':>5} {'exist':>6} {'colours':>7} {'persist':>7} {'move':>6}")
    for c, row in res["per_cfg"].items():
        mark = "  <- chosen" if float(c) == res["chosen_cfg"] else ""
        print(f"{float(c):5.1f} {row['shape_existence']:6.3f} {row['all_colours']:7.3f} {row['persist']:7.3f} "
              f"{row['move_as_named']:6.3f}{mark}")
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
