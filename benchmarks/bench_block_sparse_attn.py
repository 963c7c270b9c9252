"""GPU benchmark: dense SDPA vs mmeff's Triton block-sparse attention (forward).

Shapes are the self-attention of real video DiTs at batch 1, d=128, bf16. Each (shape, drop)
row times the kernel with random per-(head, query-block) key-block lists that keep
``round((1 - drop) * n_kblk)`` blocks, and reports the ratio against dense SDPA timed in the
same run. ``drop=0`` (every block listed) measures the kernel's overhead against SDPA.

    python benchmarks/bench_block_sparse_attn.py --out results/bsa.json
    python benchmarks/bench_block_sparse_attn.py --quick
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import mmeff.kernels.block_sparse_attn as bsa
except ImportError:  # run from a checkout without installing mmeff
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import mmeff.kernels.block_sparse_attn as bsa

# name -> (sequence length, heads)
SHAPES: dict[str, tuple[int, int]] = {
    "wan2.1-1.3b-480p": (32_760, 12),
    "wan2.1-14b-720p": (75_600, 40),
    "hunyuanvideo-720p": (118_800, 24),
}
QUICK_SHAPE = {"quick-4k": (4_096, 4)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here (also printed)")
    p.add_argument("--quick", action="store_true", help="one small shape (4k tokens, 4 heads) for a smoke run")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None, help="subset of shapes")
    p.add_argument("--drops", nargs="+", type=float, default=[0.0, 0.75, 0.8, 0.9], help="fractions of key blocks dropped")
    p.add_argument("--block", type=int, default=128, help="block size for queries and keys")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--num-warps", type=int, default=None, help="override the kernel's num_warps")
    p.add_argument("--num-stages", type=int, default=None, help="override the kernel's num_stages")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tune", action="store_true",
                   help="first sweep num_warps x num_stages on the first shape at drops 0 and 0.8 (reported under 'tune')")
    return p.parse_args(argv)


def cuda_time_ms(fn, warmup: int, iters: int) -> dict[str, float]:
    """Median and mean milliseconds of ``fn()`` measured with CUDA events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times), "min_ms": min(times)}


def random_block_lists(batch: int, heads: int, n_q: int, n_k: int, keep: int, gen: torch.Generator, device: str):
    """Random ``keep`` distinct key blocks per (b, h, query block), ascending, with full counts."""
    scores = torch.rand(batch, heads, n_q, n_k, generator=gen, device=device)
    idx = scores.topk(keep, dim=-1).indices.sort(dim=-1).values.to(torch.int32).contiguous()
    cnt = torch.full((batch, heads, n_q), keep, dtype=torch.int32, device=device)
    return idx, cnt


def bench_shape(name: str, seq: int, heads: int, args: argparse.Namespace) -> list[dict]:
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    shape = (args.batch, heads, seq, args.head_dim)
    q = torch.randn(shape, generator=gen, device=dev, dtype=dtype)
    k = torch.randn(shape, generator=gen, device=dev, dtype=dtype)
    v = torch.randn(shape, generator=gen, device=dev, dtype=dtype)
    n_blk = bsa.num_blocks(seq, args.block)
    dense = cuda_time_ms(lambda: F.scaled_dot_product_attention(q, k, v), args.warmup, args.iters)
    dense_flops = 4.0 * args.batch * heads * seq * seq * args.head_dim
    rows = []
    for drop in args.drops:
        keep = max(1, min(n_blk, round((1.0 - drop) * n_blk)))
        idx, cnt = random_block_lists(args.batch, heads, n_blk, n_blk, keep, gen, dev)

        def run(idx: torch.Tensor = idx, cnt: torch.Tensor = cnt) -> None:
            bsa.block_sparse_attention_triton(
                q, k, v, idx, cnt, block_m=args.block, block_n=args.block,
                num_warps=args.num_warps, num_stages=args.num_stages,
            )

        sparse = cuda_time_ms(run, args.warmup, args.iters)
        kept_frac = keep / n_blk
        row = {
            "shape": name, "seq": seq, "heads": heads, "drop": drop, "kept_blocks": keep, "n_blocks": n_blk,
            "dense_sdpa": dense, "block_sparse": sparse,
            "speedup_vs_dense": dense["median_ms"] / sparse["median_ms"],
            "ideal_speedup": 1.0 / kept_frac,
            "dense_tflops": dense_flops / dense["median_ms"] / 1e9,
            "sparse_effective_tflops": dense_flops * kept_frac / sparse["median_ms"] / 1e9,
        }
        if drop == 0.0:  # with every block listed the result must match dense attention
            out, _ = bsa.block_sparse_attention_triton(q, k, v, idx, cnt, block_m=args.block, block_n=args.block)
            row["max_abs_err_vs_sdpa"] = (out.float() - F.scaled_dot_product_attention(q, k, v).float()).abs().max().item()
        rows.append(row)
        print(
            f"{name:>20} drop={drop:.2f} keep={keep}/{n_blk} dense={dense['median_ms']:.2f} ms "
            f"sparse={sparse['median_ms']:.2f} ms speedup={row['speedup_vs_dense']:.2f}x "
            f"(ideal {row['ideal_speedup']:.2f}x)",
            flush=True,
        )
    return rows


def tune_launch(shape: tuple[str, tuple[int, int]], args: argparse.Namespace) -> list[dict]:
    """Time the kernel under each (num_warps, num_stages) on one shape, to choose the launch defaults."""
    name, (seq, heads) = shape
    saved = (args.num_warps, args.num_stages, args.drops)
    rows = []
    try:
        for warps in (4, 8):
            for stages in (1, 2, 3, 4):
                args.num_warps, args.num_stages, args.drops = warps, stages, [0.0, 0.8]
                try:
                    for row in bench_shape(name, seq, heads, args):
                        rows.append({"num_warps": warps, "num_stages": stages, **row})
                except Exception as exc:  # e.g. out of shared memory at this launch
                    rows.append({"num_warps": warps, "num_stages": stages, "error": repr(exc)[:300]})
                    print(f"warps={warps} stages={stages}: {exc!r}"[:300], flush=True)
                torch.cuda.empty_cache()
    finally:
        args.num_warps, args.num_stages, args.drops = saved
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_block_sparse_attn needs a CUDA GPU (this script is never part of the tests)", file=sys.stderr)
        return 2
    import triton

    shapes = QUICK_SHAPE if args.quick else {n: SHAPES[n] for n in (args.shapes or SHAPES)}
    t0 = time.time()
    tune = tune_launch(next(iter(shapes.items())), args) if args.tune else []
    results = []
    for name, (seq, heads) in shapes.items():
        results.extend(bench_shape(name, seq, heads, args))
        torch.cuda.empty_cache()  # free this shape's q/k/v before the next one
    report = {
        "benchmark": "block_sparse_attn_forward",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "env": {
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
        },
        "results": results,
        "tune": tune,
        "wall_s": time.time() - t0,
    }
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
