"""Does a zoo VLM's image-feature stream carry absolute position? A linear-probe diagnostic.

For held-out (val) scenes it collects the features the LM receives (LLaVA: projector output;
Qwen2-VL: merger output) at object tokens, fits least squares on two thirds and reports held-out
R^2 per axis for (a) the token's own grid position and (b) its object's centre. R^2 near 0 means
the LM gets no absolute position from the image features and must compute it itself.

    python scripts/feature_position_probe.py --model tiny-qwen2-vl --out docs/results/feature-position-probe-qwen.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from mmeff.zoo.load import load
from mmeff.zoo.train_vlm import SPLITS, Batcher, _split_aux
from mmeff.zoo.vision_aux import FeatureCapture, image_features_only


def held_out_r2(x: torch.Tensor, y: torch.Tensor) -> list[float]:
    n = x.shape[0]
    xa = torch.cat([x, torch.ones(n, 1)], 1)
    cut = n * 2 // 3
    w = torch.linalg.lstsq(xa[:cut], y[:cut]).solution
    pred, t = xa[cut:] @ w, y[cut:]
    return (1 - ((pred - t) ** 2).sum(0) / ((t - t.mean(0)) ** 2).sum(0)).tolist()


def probe_setup(doc: str, scenes: int) -> tuple[argparse.Namespace, Any, Any, str]:
    """Parse ``--model/--scenes/--out`` and load the model in eval mode on one thread; also
    returns the zoo family name the training batcher expects."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", default="tiny-qwen2-vl")
    ap.add_argument("--scenes", type=int, default=scenes)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, proc = load(a.model)
    model.eval()
    return a, model, proc, "tiny-qwen2-vl" if "qwen" in type(model).__name__.lower() else "tiny-llava"


def main() -> None:
    a, model, proc, name = probe_setup(__doc__, 240)
    batcher = Batcher(name, proc)
    cap = FeatureCapture(model, name == "tiny-qwen2-vl")
    lo = SPLITS["val"][0]
    feats, centres, grid_pos = [], [], []
    with torch.no_grad():
        for i in range(0, a.scenes, 16):
            inputs, t = _split_aux(batcher.images(list(range(lo + i, lo + i + 16))))
            image_features_only(model, inputs, name == "tiny-qwen2-vl")
            f = cap.take(16)
            side = int(round(f.shape[1] ** 0.5))
            pos = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1)
            pos = pos.reshape(-1, 2).float() / (side - 1)
            obj = t["shape"] > 0
            feats.append(f[obj].float())
            centres.append(t["centre"][obj].float())
            grid_pos.append(pos.expand(16, -1, -1)[obj])
    x = torch.cat(feats)
    report = {"model": a.model, "scenes": a.scenes, "object_tokens": int(x.shape[0]),
              "heldout_r2_token_grid_position_row_col": held_out_r2(x, torch.cat(grid_pos)),
              "heldout_r2_object_centre": held_out_r2(x, torch.cat(centres))}
    print(json.dumps(report, indent=1))
    if a.out:
        a.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
