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

from mmeff.kernels.chunk_routed_attn import key_chunk_index
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


def local_qkv(grid: tuple[int, int, int], heads: int, text: int, head_dim: int, device: str, dtype: torch.dtype,
              g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[1, heads, T*H*W + text, d]`` in raster order whose attention is local, like a video DiT's.

    Each head embeds the latent coordinates with random Fourier features ``e(p)`` (unit norm, so
    ``e(p) . e(p')`` is about ``exp(-|p - p'|^2 / 2 l^2)``), with its own length scale ``l`` (1.5 to 6
    latent cells) and sharpness; ``q = a e(p) + noise`` and ``k = a e(p) + noise``. A query then puts
    most of its mass on nearby tokens and the rest spread thinly over the whole video, and
    neighbouring queries route alike. With i.i.d. random q and k, by contrast, attention is nearly
    uniform, so no sparse method can be accurate and per-token routing (VMoBA) has nothing to share.
    Text tokens (keys and queries) are plain noise; v is i.i.d. normal.
    """
    t, h, w = grid
    coords = torch.stack(torch.meshgrid(*(torch.arange(n, device=device, dtype=torch.float32) for n in grid),
                                        indexing="ij"), -1).reshape(-1, 3)  # [N, 3] raster order
    q = torch.empty(1, heads, t * h * w + text, head_dim, device=device, dtype=dtype)
    k = torch.empty_like(q)
    for i in range(heads):
        scale_len = 1.5 + 4.5 * i / max(1, heads - 1)
        freq = torch.randn(3, head_dim, generator=g, device=device) / scale_len
        phase = torch.rand(head_dim, generator=g, device=device) * 2 * torch.pi
        emb = torch.cos(coords @ freq + phase) * (2.0 / head_dim) ** 0.5  # [N, d], |e| ~ 1
        sharp = (head_dim ** 0.5 * (6.0 + 6.0 * ((i * 7) % heads) / heads)) ** 0.5  # a^2 / sqrt(d) in [6, 12]
        noise = 0.3
        q[0, i, : t * h * w] = (sharp * emb + noise * torch.randn(emb.shape, generator=g, device=device)).to(dtype)
        k[0, i, : t * h * w] = (sharp * emb + noise * torch.randn(emb.shape, generator=g, device=device)).to(dtype)
    if text:
        q[..., t * h * w:, :] = torch.randn(1, heads, text, head_dim, generator=g, device=device).to(dtype)
        k[..., t * h * w:, :] = torch.randn(1, heads, text, head_dim, generator=g, device=device).to(dtype)
    v = torch.randn(q.shape, generator=g, device=device, dtype=dtype)
    return q, k, v


def vmoba_breakdown(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ids: torch.Tensor, topk: int,
                    dense_s: float, repeats: int) -> list[dict]:
    """Where VMoBA's time goes, old path against new, all against dense SDPA of the same run.

    - routing: the torch path (``[S, n_chunks]`` gates + ``topk``/sort) vs the fused Triton router
      (top-k and threshold), and how often the two pick the same chunks;
    - attention: the query-major kernel at several query tiles (``work`` = fraction of dense key
      reads: each tile visits the union of its rows' chunks) vs the key-major kernel (tiles of
      queries that chose one chunk: ``work`` = per-query density) at several tiles.
    """
    from mmeff.kernels.chunk_routed_attn import chunk_routed_attention_triton, tile_union
    from mmeff.kernels.chunk_routed_attn.key_major import chunk_routed_attention_key_major
    from mmeff.kernels.chunk_routing import route_chunks
    from mmeff.video.vmoba_core import _chunk_layout, chunk_gates, chunk_mean_keys, select_chunks

    run = timer("cuda" if q.is_cuda else "cpu")
    seq = q.shape[2]
    starts = _chunk_layout(seq, ids, None, q.device)
    qchunk = key_chunk_index(starts, seq)
    lengths = (starts[1:] - starts[:-1]).float()
    rows = []

    def add(method: str, seconds: float, **extra) -> None:
        rows.append({"shape": name, "method": method, "seconds": seconds, "speedup": dense_s / seconds,
                     "share_of_dense": seconds / dense_s, **extra})
        print(f"{name} {method} {extra}: {seconds * 1e3:.2f} ms ({seconds / dense_s:.3f} of dense)")

    add("vmoba_routing_torch", run(lambda: select_chunks(chunk_gates(q, k, starts), qchunk, mode="topk", topk=topk), repeats),
        mode="topk")
    add("vmoba_routing_torch", run(lambda: select_chunks(chunk_gates(q, k, starts), qchunk, mode="threshold",
                                                         threshold=0.25), repeats), mode="threshold")
    sel = select_chunks(chunk_gates(q, k, starts), qchunk, mode="topk", topk=topk)
    fused = lambda mode: route_chunks(q, chunk_mean_keys(k, starts), qchunk, mode=mode, topk=topk, threshold=0.25)  # noqa: E731
    idx = fused("topk")
    fused_mask = torch.zeros_like(sel).scatter_(-1, idx.long(), True)
    agree = float((fused_mask == sel).all(-1).float().mean())
    add("vmoba_routing_fused", run(lambda: fused("topk"), repeats), mode="topk", rows_agreeing_with_torch=agree)
    thr_t = select_chunks(chunk_gates(q, k, starts), qchunk, mode="threshold", threshold=0.25)
    agree_t = float((fused("threshold") == thr_t).all(-1).float().mean())
    add("vmoba_routing_fused", run(lambda: fused("threshold"), repeats), mode="threshold", rows_agreeing_with_torch=agree_t)
    del thr_t

    density = float(lengths[idx.long()].sum(-1).mean() / seq)
    for bm, bn in ((16, 64), (64, 64), (64, 32)):
        tidx, _ = tile_union(sel, bm)
        keys = (lengths[tidx.clamp_min(0).long()] * (tidx >= 0)).sum(-1)  # keys read per tile
        s = run(lambda: chunk_routed_attention_triton(q, k, v, starts, sel, block_m=bm, block_n=bn), repeats)
        add("vmoba_kernel_query_major", s, block_m=bm, block_n=bn, work=float(keys.mean() / seq))
    ref = F.scaled_dot_product_attention(q, k, v).float()
    for bm, bn in ((32, 32), (64, 32), (64, 64), (128, 32)):
        s = run(lambda: chunk_routed_attention_key_major(q, k, v, starts, idx, block_m=bm, block_n=bn), repeats)
        out, _ = chunk_routed_attention_key_major(q, k, v, starts, idx, block_m=bm, block_n=bn)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        add("vmoba_kernel_key_major", s, block_m=bm, block_n=bn, work=density, rel_error_vs_dense=err)
    return rows


def bench_shape(name: str, grid: tuple[int, int, int], heads: int, text: int, drops: list[float], device: str,
                dtype: torch.dtype, repeats: int, block: int, head_dim: int, inputs: str = "local",
                batch: int = 1) -> list[dict]:
    t, h, w = grid
    n_v = t * h * w
    g = torch.Generator(device=device).manual_seed(0)
    shape = (batch, heads, n_v + text, head_dim)
    if inputs == "local":  # every sample draws its own features, so samples route differently
        samples = [local_qkv(grid, heads, text, head_dim, device, dtype, g) for _ in range(batch)]
        q_r, k_r, v_r = (torch.cat(parts) for parts in zip(*samples))
        del samples
    else:
        q_r, k_r, v_r = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))
    # Rectified SpaAttn sees the video tokens in gilbert order (text stays last).
    gil = torch.cat([gilbert_order(t, h, w, device=device), torch.arange(n_v, n_v + text, device=device)])
    q, k, v = (x[:, :, gil].contiguous() for x in (q_r, k_r, v_r))
    run = timer(device)
    dense_s = run(lambda: F.scaled_dot_product_attention(q, k, v), repeats)
    rows = [{"shape": name, "batch": batch, "tokens": n_v + text, "heads": heads, "method": "dense_sdpa",
             "seconds": dense_s, "speedup": 1.0}]
    neigh = block_neighbours(gil[:n_v], t, h, w, block, device=device)
    ref = F.scaled_dot_product_attention(q, k, v).float()
    for drop in drops:
        for label, ipar, gapr in (("rectified", True, True), ("block_sparse", False, False)):
            fn = lambda: rectified_sparse_attention(q, k, v, n_visual=n_v, text_len=text, block=block, drop=drop,  # noqa: E731
                                                    tau=0.3, neighbours=neigh, ipar=ipar, gapr=gapr)
            s = run(fn, repeats)
            out, st = rectified_sparse_attention(q, k, v, n_visual=n_v, text_len=text, block=block, drop=drop,
                                                 tau=0.3, neighbours=neigh, ipar=ipar, gapr=gapr, return_stats=True)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            rows.append({"shape": name, "batch": batch, "tokens": n_v + text, "heads": heads, "method": label, "drop": drop,
                         "seconds": s, "speedup": dense_s / s, "rel_error_vs_dense": err,
                         "kept_fraction": float(st.kept_fraction.float().mean())})
            print(f"{name} {label} drop {drop}: {s * 1e3:.1f} ms (x{dense_s / s:.2f} vs dense), rel err {err:.3f}")
    chunk, topk = VMOBA_CHUNKS.get(name, VMOBA_CHUNKS["quick"])
    if text == 0:
        perm, ids, n_chunks = partition_order(t, h, w, chunk)
        qp, kp, vp = (x[:, :, perm.to(device)].contiguous() for x in (q_r, k_r, v_r))
        ids = ids.to(device)
        fn = lambda: vmoba_attention(qp, kp, vp, chunk_ids=ids, mode="topk", topk=min(topk, n_chunks))  # noqa: E731
        s = run(fn, repeats)
        out, st = vmoba_attention(qp, kp, vp, chunk_ids=ids, mode="topk", topk=min(topk, n_chunks), return_stats=True)
        ref_p = F.scaled_dot_product_attention(qp, kp, vp).float()
        err = ((out.float() - ref_p).norm() / ref_p.norm()).item()
        rows.append({"shape": name, "batch": batch, "tokens": n_v, "heads": heads, "method": "vmoba_topk", "chunk": list(chunk),
                     "topk": topk, "seconds": s, "speedup": dense_s / s, "rel_error_vs_dense": err,
                     "density": float(st["density"])})
        print(f"{name} vmoba topk {topk} of {n_chunks}: {s * 1e3:.1f} ms (x{dense_s / s:.2f}), rel err {err:.3f}, "
              f"density {float(st['density']):.3f}")
        if device == "cuda":  # the whole op with the older query-major kernel (fused routing in both)
            fn = lambda: vmoba_attention(qp, kp, vp, chunk_ids=ids, mode="topk", topk=min(topk, n_chunks),  # noqa: E731
                                         layout="query_major")
            s = run(fn, repeats)
            rows.append({"shape": name, "batch": batch, "tokens": n_v, "heads": heads, "method": "vmoba_topk_query_major",
                         "chunk": list(chunk), "topk": topk, "seconds": s, "speedup": dense_s / s})
            print(f"{name} vmoba topk, query-major kernel: {s * 1e3:.1f} ms (x{dense_s / s:.2f})")
        fn = lambda: vmoba_attention(qp, kp, vp, chunk_ids=ids, mode="threshold", threshold=0.25)  # noqa: E731
        s = run(fn, repeats)
        out, st = vmoba_attention(qp, kp, vp, chunk_ids=ids, mode="threshold", threshold=0.25, return_stats=True)
        err = ((out.float() - ref_p).norm() / ref_p.norm()).item()
        rows.append({"shape": name, "batch": batch, "tokens": n_v, "heads": heads, "method": "vmoba_threshold", "chunk": list(chunk),
                     "threshold": 0.25, "seconds": s, "speedup": dense_s / s, "rel_error_vs_dense": err,
                     "density": float(st["density"])})
        print(f"{name} vmoba threshold 0.25: {s * 1e3:.1f} ms (x{dense_s / s:.2f}), rel err {err:.3f}, "
              f"density {float(st['density']):.3f}")
        if device == "cuda":
            rows += vmoba_breakdown(name, qp, kp, vp, ids, min(topk, n_chunks), dense_s, repeats)
    return rows


# Wan 2.1 transformer configs (diffusers names) and their latent at 81 frames: (config, latent [B, C, T, H, W])
WAN_TRANSFORMERS = {
    "wan1.3b-480p": (dict(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                          text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                          qk_norm="rms_norm_across_heads"), (1, 16, 21, 60, 104)),
    "wan14b-720p": (dict(num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
                         text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                         qk_norm="rms_norm_across_heads"), (1, 16, 21, 90, 160)),
    # HunyuanVideo 13B at 720p, 129 frames: latent 33 x 90 x 160, patch 2 -> 118,800 video tokens, 256 text.
    "hunyuan-720p": (dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
                          num_layers=20, num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0,
                          patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True,
                          text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
                          rope_axes_dim=(16, 56, 56)), (1, 16, 33, 90, 160)),
}


def _transformer_inputs(name: str, cfg: dict, latent: tuple, quick: bool, device: str, dtype: torch.dtype,
                        g: torch.Generator) -> dict:
    x = torch.randn(latent, generator=g, device=device, dtype=dtype)
    if name.startswith("hunyuan"):
        text = torch.randn(1, 256, cfg["text_embed_dim"], generator=g, device=device, dtype=dtype)
        mask = torch.zeros(1, 256, dtype=torch.long, device=device)
        mask[:, :200] = 1  # 56 padded text tokens, as a short prompt gives
        return dict(hidden_states=x, timestep=torch.tensor([500], device=device), encoder_hidden_states=text,
                    encoder_attention_mask=mask, guidance=torch.tensor([6000.0], device=device, dtype=dtype),
                    pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g, device=device,
                                                   dtype=dtype), return_dict=False)
    text = torch.randn(1, 512 if not quick else 8, cfg["text_dim"], generator=g, device=device, dtype=dtype)
    return dict(hidden_states=x, timestep=torch.tensor([500], device=device), encoder_hidden_states=text,
                return_dict=False)


def bench_transformer(device: str, dtype: torch.dtype, repeats: int, drops: list[float], quick: bool,
                      name: str = "wan1.3b-480p") -> list[dict]:
    """Full transformer forward (random weights; Wan at 81 frames, HunyuanVideo at 129): dense vs Rectified SpaAttn."""
    import diffusers
    import mmeff
    from mmeff.video import RectifiedSpaAttn

    if quick:
        cfg = dict(num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, text_dim=32,
                   freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64)
        latent, block = (1, 16, 4, 16, 16), 16
    else:
        cfg, latent = WAN_TRANSFORMERS[name]
        block = 128
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: a 14B model in fp32 would not fit beside it
    try:
        with torch.device(device):
            if name.startswith("hunyuan") and not quick:
                model = diffusers.HunyuanVideoTransformer3DModel(**cfg).eval()
            else:
                model = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), **cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    g = torch.Generator(device=device).manual_seed(0)
    kw = _transformer_inputs(name, cfg, latent, quick, device, dtype, g)
    run = timer(device)
    label = f"{name}-transformer"
    with torch.no_grad():
        dense_s = run(lambda: model(**kw), repeats)
        ref = model(**kw)[0].float()
        rows = [{"shape": label, "method": "dense", "seconds": dense_s, "speedup": 1.0}]
        print(f"{label} dense: {dense_s:.3f} s")
        for drop in drops:
            with mmeff.apply(model, RectifiedSpaAttn(drop=drop, block=block, warmup_steps=0, dense_layers=(),
                                                     preset="none")):
                s = run(lambda: model(**kw), repeats)
                out = model(**kw)[0].float()
            err = ((out - ref).norm() / ref.norm()).item()
            rows.append({"shape": label, "method": "rectified", "drop": drop, "seconds": s,
                         "speedup": dense_s / s, "rel_error_vs_dense": err})
            print(f"{label} rectified drop {drop}: {s:.3f} s (x{dense_s / s:.2f}), rel err {err:.3f}")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_video_sparse_attn.json")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--drops", default="0.75,0.8,0.9")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--transformer", nargs="*", default=None, choices=sorted(WAN_TRANSFORMERS),
                    help="also time full transformer forwards (default: wan1.3b-480p)")
    ap.add_argument("--transformer-repeats", type=int, default=None, help="timed forwards per case (default --repeats)")
    ap.add_argument("--inputs", choices=["local", "random"], default="local",
                    help="q/k/v with local attention like a video DiT (default) or i.i.d. random (near-uniform attention)")
    ap.add_argument("--batch", type=int, default=1, help="samples per attention call (each with its own q/k/v)")
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
        rows += bench_shape(name, grid, heads, text, drops, device, dtype, args.repeats, block, head_dim, args.inputs,
                            args.batch)
    if args.quick:
        rows += bench_transformer(device, dtype, args.repeats, drops, True)
    elif args.transformer is not None:
        for name in args.transformer or ["wan1.3b-480p"]:
            rows += bench_transformer(device, dtype, args.transformer_repeats or args.repeats, drops, False, name)
    import triton
    meta = {"config": vars(args), "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
            "versions": {"torch": torch.__version__, "triton": triton.__version__}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
