"""Sparsity maps of the video sparse-attention methods on one generation of ``tiny-wan``.

Usage::

    python -m mmeff.eval.sparsity_maps --out docs/results/sparsity-maps-tiny-wan.png

For each method (default: Rectified SpaAttn at drop 0.75 and VMoBA top-k) one video is generated and the
handle's report is drawn:

- skipped-attention fraction per (denoising step, layer): dense warm-up steps and dense layers show as blank;
- Rectified SpaAttn only: the fraction per (layer, head), and the selected key blocks (columns) of every
  query block (rows) for the first heads of a few layers at the last step (``record_masks=True``), blocks in
  3-D Hilbert order, so a band near the diagonal is spatio-temporal locality.

The numbers go to a JSON next to the PNG with the config and library versions.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_METHODS = {
    "rectified_spaattn d=0.75": "rectified_spaattn:drop=0.75,tau=0.2,block=16,preset=none,warmup_steps=2,"
                                "dense_layers=0,first_frame_dense=true,record_masks=true",
    "vmoba top-k": "vmoba:temporal_chunk=1,spatial_chunk=4x4,st_chunk=2x4x4,mode=topk,topk=2;2;3,"
                   "first_full_layer=1,warmup_steps=2",
}


def step_layer_matrix(per_step_layer: dict[Any, dict[Any, float]], steps: int, layers: int) -> np.ndarray:
    """``{step: {layer: x}}`` as a ``[steps, layers]`` array with NaN where the call ran dense."""
    m = np.full((steps, layers), np.nan)
    for s, row in per_step_layer.items():
        for layer, x in row.items():
            if int(s) < steps and int(layer) < layers:
                m[int(s), int(layer)] = x
    return m


def measure(pipe: Any, methods: dict[str, str], prompt: str, seed: int, steps: int) -> dict[str, Any]:
    """Generate once per method; return each method's report (block masks as nested lists)."""
    import mmeff

    from ..zoo.load_video import TINY_WAN_CALL, TINY_WAN_CFG
    from .video_fidelity import generate

    n_layers = len(pipe.transformer.blocks)
    out: dict[str, Any] = {"prompt": prompt, "seed": seed, "steps": steps, "layers": n_layers, "methods": {}}
    for label, spec in methods.items():
        with mmeff.apply(pipe, spec) as h:
            generate(pipe, prompt, seed, steps=steps, cfg=TINY_WAN_CFG, call=dict(TINY_WAN_CALL))
            rep = next(iter(h.report()["per_method"].values()))
        masks = {int(k): v.to(torch.uint8).tolist() for k, v in rep.get("block_masks", {}).items()}
        out["methods"][label] = {
            "spec": spec,
            "step_layer": step_layer_matrix(rep["sparsity_per_step_layer"], steps, n_layers).tolist(),
            "layer_head": {int(k): v for k, v in rep.get("sparsity_per_layer_head", {}).items()},
            "block_masks_last_step": masks,
            "calls": rep["calls"],
        }
    return out


def draw(data: dict[str, Any], path: Path, mask_layers: int = 4, mask_heads: int = 2) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save_figure

    methods = data["methods"]
    rect = next((m for m in methods.values() if m["block_masks_last_step"]), None)
    n_rows = 1 + (1 if rect else 0)
    n_cols = max(len(methods) + (1 if rect else 0), mask_layers * mask_heads if rect else 0)
    fig = plt.figure(figsize=(2.6 * n_cols, 2.9 * n_rows + 0.5))
    grid = fig.add_gridspec(n_rows, n_cols)
    col = 0
    for label, m in methods.items():
        ax = fig.add_subplot(grid[0, col:col + 1])
        im = ax.imshow(np.array(m["step_layer"], dtype=float), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"{label}\nskipped fraction", fontsize=8)
        ax.set_xlabel("layer", fontsize=7)
        ax.set_ylabel("step", fontsize=7)
        col += 1
    if rect:
        lh = rect["layer_head"]
        layers = sorted(lh)
        mat = np.array([lh[k] for k in layers])
        ax = fig.add_subplot(grid[0, col:col + 1])
        ax.imshow(mat, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(layers)), [str(k) for k in layers], fontsize=6)
        ax.set_title("rectified: skipped per head", fontsize=8)
        ax.set_xlabel("head", fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.05)
        masks = rect["block_masks_last_step"]
        shown = sorted(masks)[:mask_layers]
        c = 0
        for layer in shown:
            for head in range(min(mask_heads, len(masks[layer]))):
                ax = fig.add_subplot(grid[1, c:c + 1])
                ax.imshow(np.array(masks[layer][head]), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
                ax.set_title(f"layer {layer} head {head}: kept blocks", fontsize=7)
                ax.set_xlabel("key block", fontsize=6)
                ax.set_ylabel("query block", fontsize=6)
                ax.set_xticks([])
                ax.set_yticks([])
                c += 1
    fig.suptitle(f"tiny-wan sparsity maps, {data['steps']} steps, prompt: {data['prompt'][:70]}", fontsize=9)
    save_figure(fig, path)


def scene_prompt(pipe: Any, seed: int) -> str:
    """The prompt of scene ``seed`` in the prompt family ``pipe`` was trained on."""
    from ..zoo.load_video import TINY_WAN_CALL
    from ..zoo.prompt_family import pipeline_family, scene_of_seed, video_prompt_of

    family = pipeline_family(pipe)
    return video_prompt_of(family, scene_of_seed(family, seed), int(TINY_WAN_CALL["num_frames"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-wan")
    p.add_argument("--seed", type=int, default=5, help="scene seed: the prompt and the sampling seed")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--method", action="append", default=[], metavar="SPEC",
                   help="method spec (repeatable; default: Rectified SpaAttn d=0.75 and VMoBA top-k)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/sparsity-maps.png")
    args = p.parse_args(argv)
    import diffusers

    from ..zoo.load_video import load_video_pipeline
    from .report import versions

    torch.set_num_threads(args.threads)
    methods = {m: m for m in args.method} if args.method else dict(DEFAULT_METHODS)
    pipe = load_video_pipeline(args.model)
    prompt = scene_prompt(pipe, args.seed)
    data = measure(pipe, methods, prompt, args.seed, args.steps)
    out = Path(args.out)
    draw(data, out)
    doc = {"format": "mmeff.sparsity_maps/1", "config": {"model": args.model, "seed": args.seed, "steps": args.steps,
                                                         "methods": methods, "prompt": prompt},
           "versions": {**versions(), "diffusers": diffusers.__version__}, "png": str(out), **data}
    out.with_suffix(".json").write_text(json.dumps(doc) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
