"""Weight-space interpolation of a zoo model and its fine-tune (WiSE-FT, Wortsman et al., CVPR 2022).

``θ = (1 - α) θ_parent + α θ_fine-tuned``. A fine-tune that buys a new robustness (here: visual tokens going
missing) at some cost in the parent's own skill can often keep most of the first and lose little of the
second at an intermediate α, without any further training. The result is saved with the parent's
processor and a ``training.json`` that records both sources and α.

    python -m mmeff.zoo.interpolate --parent mmeff/zoo/models/tiny-llava --tuned runs/ft --alpha 0.5 --out runs/mix
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"


def interpolate(parent: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * parent + alpha * tuned`` per tensor; both must have the same keys, shapes and dtypes."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if parent.keys() != tuned.keys():
        raise ValueError(f"the two models differ in parameters: {sorted(set(parent) ^ set(tuned))[:5]}")
    out = {}
    for name, a in parent.items():
        b = tuned[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f"{name}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
        out[name] = torch.lerp(a.float(), b.float(), alpha).to(a.dtype) if a.is_floating_point() else a.clone()
    return out


def write_mix(parent: Path, tuned: Path, alpha: float, out: Path) -> dict[str, Any]:
    """Save the interpolated model in ``out`` (config/processor files copied from ``tuned``) with its lineage."""
    mixed = interpolate(load_file(parent / WEIGHTS), load_file(tuned / WEIGHTS), alpha)
    out.mkdir(parents=True, exist_ok=True)
    for f in tuned.iterdir():
        if f.is_file() and f.name not in (WEIGHTS, "training.json", "eval_dense.json"):
            shutil.copy2(f, out / f.name)
    save_file(mixed, str(out / WEIGHTS), metadata={"format": "pt"})

    def info(folder: Path) -> dict[str, Any]:
        f = folder / "training.json"
        data = json.loads(f.read_text()) if f.is_file() else {}
        return {k: v for k, v in data.items() if k != "history"}

    tuned_info = info(tuned)
    lineage = {**tuned_info, "interpolation": {
        "method": "WiSE-FT weight interpolation: (1 - alpha) * parent + alpha * fine-tuned",
        "alpha": alpha, "parent": str(parent), "fine_tuned": str(tuned)}}
    (out / "training.json").write_text(json.dumps(lineage, indent=2) + "\n")
    return lineage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmeff.zoo.interpolate", description=__doc__.split("\n\n")[0])
    p.add_argument("--parent", type=Path, required=True, help="folder of the model that was fine-tuned")
    p.add_argument("--tuned", type=Path, required=True, help="folder of the fine-tuned model")
    p.add_argument("--alpha", type=float, required=True, help="0 = the parent, 1 = the fine-tune")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    for folder in (args.parent, args.tuned):
        if not (folder / WEIGHTS).is_file():
            p.error(f"{folder} has no {WEIGHTS}; give a saved zoo model folder")
    try:
        write_mix(args.parent, args.tuned, args.alpha, args.out)
    except ValueError as exc:
        p.error(str(exc))
    print(f"wrote {args.out} (alpha {args.alpha})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
