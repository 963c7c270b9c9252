"""One figure from a folder of GPU benchmark JSONs: kernel speedup vs kept blocks, the sparse attention
ops' speed and error vs dense, and full-transformer speedups.

    python benchmarks/plot_gpu_results.py docs/results/gpu-2026-11-22
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _load(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else None


def plot(folder: Path, out: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    bsa = _load(folder, "bench_block_sparse_attn.json")
    if bsa:
        ax = axes[0]
        shapes = sorted({r["shape"] for r in bsa["results"]})
        for shape in shapes:
            rows = [r for r in bsa["results"] if r["shape"] == shape]
            kept = [r["kept_blocks"] / r["n_blocks"] for r in rows]
            ax.plot(kept, [r["speedup_vs_dense"] for r in rows], "o-", label=shape)
        xs = [0.1, 0.25, 0.5, 1.0]
        ax.plot(xs, [1 / x for x in xs], "k:", label="ideal (1 / kept)")
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel("kept key blocks (fraction)"), ax.set_ylabel("speed-up vs dense SDPA")
        ax.set_title(f"block-sparse kernel ({bsa['env']['gpu']}, bf16, d=128)")
        ax.legend(fontsize=8), ax.grid(alpha=0.3, which="both")
    video = _load(folder, "bench_video_sparse_attn.json")
    if video:
        ax = axes[1]
        for method, marker in (("rectified", "o"), ("block_sparse", "s")):
            for shape in sorted({r["shape"] for r in video["results"]
                                 if r.get("method") == method and not r["shape"].endswith("-transformer")}):
                rows = [r for r in video["results"] if r["shape"] == shape and r["method"] == method]
                ax.plot([r["rel_error_vs_dense"] for r in rows], [r["speedup"] for r in rows], marker + "-",
                        label=f"{method} {shape}")
        ax.set_xlabel("relative error vs dense (local q/k inputs)"), ax.set_ylabel("speed-up vs dense SDPA")
        ax.set_title("attention op incl. selection (drops 0.75 / 0.8 / 0.9)")
        ax.legend(fontsize=7), ax.grid(alpha=0.3)
    ax = axes[2]
    rows = []
    for name in ("bench_video_sparse_attn.json", "bench_hunyuan_transformer.json"):
        data = _load(folder, name)
        if data:
            rows += [r for r in data["results"] if r["shape"].endswith("-transformer") and r["method"] == "rectified"]
    labels = [f"{r['shape'].replace('-transformer', '')}\ndrop {r['drop']}" for r in rows]
    ax.bar(range(len(rows)), [r["speedup"] for r in rows], color="tab:green")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, fontsize=6, rotation=60)
    ax.set_ylabel("forward speed-up vs dense"), ax.set_title("full transformer, random weights, Rectified SpaAttn")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print("wrote", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="PNG path (default: FOLDER/summary.png)")
    args = ap.parse_args()
    plot(args.folder, args.out or args.folder / "summary.png")


if __name__ == "__main__":
    main()
