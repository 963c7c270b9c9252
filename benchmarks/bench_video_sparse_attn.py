"""Video sparse attention on the GPU: dense SDPA vs Rectified SpaAttn (incl. selection + rectification),
plain block-sparse, and VMoBA, at the attention shapes of real video DiTs; optionally a full Wan
transformer forward with random weights. Ratios are against dense SDPA measured in the same run.

    python benchmarks/bench_video_sparse_attn.py --out runs/bench_video.json [--transformer]
    python benchmarks/bench_video_sparse_attn.py --quick   # tiny shapes on CPU: checks the script only
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from mmeff.video.layout import block_neighbours, gilbert_order
from mmeff.video.rectified_core import rectified_sparse_attention
from mmeff.video.vmoba_core import vmoba_attention
from mmeff.video.vmoba_partition import partition_order

# name: (latent grid T, H, W; heads; text tokens in the joint sequence)
SHAPES = {
    "wan1.3b-480p": ((21, 30, 52), 12, 0),       # 32,760 tokens
    "wan14b-720p": ((21, 45, 80), 40, 0),        # 75,600 tokens
    "hunyuan-720p": ((33, 45, 80), 24, 256),     # 118,800 video tokens + text
}
VMOBA_CHUNKS = {  # (chunk spec, topk) for the 3-D layer kind; [recon] for the larger grids
    "wan1.3b-480p": ((3, 6, 4), 15),
    "wan14b-720p": ((3, 9, 8), 16),
    "hunyuan-720p": ((3, 9, 8), 16),
    "quick": ((2, 2, 2), 2),
}


def timer(device: str) -> Callable[[Callable[[], object], int], float]:
    def run(fn: Callable[[], object], repeats: int) -> float:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(repeats):
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
        else:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]
    return run


def bench_shape(name: str, grid: tuple[int, int, int], heads: int, text: int, drops: list[float], device: str,
                dtype: torch.dtype, repeats: int, block: int, head_dim: int) -> list[dict]:
    t, h, w = grid
    n_v = t * h * w
    g = torch.Generator(device=device).manual_seed(0)
    shape = (1, heads, n_v + text, head_dim)
    q, k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))
    run = timer(device)
    dense_s = run(lambda: F.scaled_dot_product_attention(q, k, v), repeats)
    rows = [{"shape": name, "tokens": n_v + text, "heads": heads, "method": "dense_sdpa", "seconds": dense_s,
             "speedup": 1.0}]
    order = gilbert_order(t, h, w, device=device)
    neigh = block_neighbours(order, t, h, w, block, device=device)
    ref = F.scaled_dot_product_attention(q, k, v).float()
    for drop in drops:
        for label, ipar, gapr in (("rectified", True, True), ("block_sparse", False, False)):
            fn = lambda: rectified_sparse_attention(q, k, v, n_visual=n_v, text_len=text, block=block, drop=drop,  # noqa: E731
                                                    tau=0.3, neighbours=neigh, ipar=ipar, gapr=gapr)
            s = run(fn, repeats)
            out, st = rectified_sparse_attention(q, k, v, n_visual=n_v, text_len=text, block=block, drop=drop,
                                                 tau=0.3, neighbours=neigh, ipar=ipar, gapr=gapr, return_stats=True)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            rows.append({"shape": name, "tokens": n_v + text, "heads": heads, "method": label, "drop": drop,
                         "seconds": s, "speedup": dense_s / s, "rel_error_vs_dense": err,
                         "kept_fraction": float(st.kept_fraction.float().mean())})
            print(f"{name} {label} drop {drop}: {s * 1e3:.1f} ms (x{dense_s / s:.2f} vs dense), rel err {err:.3f}")
    chunk, topk = VMOBA_CHUNKS.get(name, VMOBA_CHUNKS["quick"])
    if text == 0:
        perm, ids, n_chunks = partition_order(t, h, w, chunk)
        qp, kp, vp = (x[:, :, perm.to(device)] for x in (q, k, v))
        ids = ids.to(device)
        fn = lambda: vmoba_attention(qp, kp, vp, chunk_ids=ids, mode="topk", topk=min(topk, n_chunks))  # noqa: E731
        s = run(fn, repeats)
        rows.append({"shape": name, "tokens": n_v, "heads": heads, "method": "vmoba_topk", "chunk": list(chunk),
                     "topk": topk, "seconds": s, "speedup": dense_s / s})
        print(f"{name} vmoba topk {topk} of {n_chunks}: {s * 1e3:.1f} ms (x{dense_s / s:.2f})")
    return rows


def bench_transformer(device: str, dtype: torch.dtype, repeats: int, drops: list[float], quick: bool) -> list[dict]:
    """Full WanTransformer3DModel forward (1.3B config, random weights) at 480p/81 frames."""
    import mmeff
    from diffusers import WanTransformer3DModel
    from mmeff.video import RectifiedSpaAttn

    if quick:
        cfg = dict(num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, text_dim=32,
                   freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64)
        latent, block = (1, 16, 4, 16, 16), 16
    else:
        cfg = dict(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                   freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads")
        latent, block = (1, 16, 21, 60, 104), 128
    with torch.device(device):
        model = WanTransformer3DModel(patch_size=(1, 2, 2), **cfg).to(dtype).eval()
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(latent, generator=g, device=device, dtype=dtype)
    text = torch.randn(1, 512 if not quick else 8, cfg["text_dim"], generator=g, device=device, dtype=dtype)
    kw = dict(hidden_states=x, timestep=torch.tensor([500], device=device), encoder_hidden_states=text,
              return_dict=False)
    run = timer(device)
    with torch.no_grad():
        dense_s = run(lambda: model(**kw), repeats)
        ref = model(**kw)[0].float()
        rows = [{"shape": "wan1.3b-480p-transformer", "method": "dense", "seconds": dense_s, "speedup": 1.0}]
        for drop in drops:
            with mmeff.apply(model, RectifiedSpaAttn(drop=drop, block=block, warmup_steps=0, dense_layers=(),
                                                     preset="none")):
                s = run(lambda: model(**kw), repeats)
                out = model(**kw)[0].float()
            err = ((out - ref).norm() / ref.norm()).item()
            rows.append({"shape": "wan1.3b-480p-transformer", "method": "rectified", "drop": drop, "seconds": s,
                         "speedup": dense_s / s, "rel_error_vs_dense": err})
            print(f"transformer rectified drop {drop}: {s:.3f} s (x{dense_s / s:.2f}), rel err {err:.3f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_video_sparse_attn.json")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--drops", default="0.75,0.8,0.9")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--transformer", action="store_true", help="also time a full Wan 1.3B transformer forward")
    ap.add_argument("--quick", action="store_true", help="tiny shapes on CPU (naive kernels): checks the script only")
    args = ap.parse_args()
    drops = [float(x) for x in args.drops.split(",")]
    if args.quick:
        device, dtype, block, head_dim = "cpu", torch.float32, 16, 16
        shapes = {"quick": ((4, 8, 8), 2, 0), "quick-text": ((4, 8, 8), 2, 8)}
        args.repeats = 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (use --quick to check the script on CPU)")
        device, dtype, block, head_dim = "cuda", torch.bfloat16, 128, 128
        shapes = {k: SHAPES[k] for k in args.shapes.split(",")}
    rows = []
    for name, (grid, heads, text) in shapes.items():
        rows += bench_shape(name, grid, heads, text, drops, device, dtype, args.repeats, block, head_dim)
    if args.transformer or args.quick:
        rows += bench_transformer(device, dtype, args.repeats, drops, args.quick)
    import triton
    meta = {"config": vars(args), "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
            "versions": {"torch": torch.__version__, "triton": triton.__version__}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
