"""Fidelity of sparse video attention against dense generation on ``tiny-wan``.

Usage::

    python -m mmeff.eval.video_fidelity --out runs/video_fidelity.json --n 8 --steps 10

For ``n`` held-out prompts (*test*-split scenes of the pipeline's prompt family, :mod:`mmeff.zoo.prompt_family`:
``make_layout_video_prompt`` for a layout tiny-wan, ``make_prompt`` otherwise; the scene seed is also the sampling
seed) a dense video is generated, then one per sparse method with the same prompt, seed, steps and CFG. Each sparse
video is scored against its dense twin:

- **PSNR** (dB) over all frames and channels of the decoded video in [0, 1]: ``10 log10(1 / MSE)``, with the
  MSE floored at 1e-10 (identical videos give 100 dB, never infinity).
- **SSIM** (scikit-image's ``structural_similarity``, :func:`ssim_skimage`): the Wang et al. (2004) index with a
  Gaussian window (sigma 1.5, 11 x 11), ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, ``L = 1``, population
  covariances, per frame over the RGB channels, averaged over frames. The torch twin :func:`ssim` (valid window
  positions, float64) is tested equal to it and is what the demo uses (no scikit-image import there).
- **VLM presence** (``--vlm``, default ``tiny-qwen2-vl``): on sampled frames (first and last) of every video the
  zoo VLM answers "Is there a <shape> in the image?" for all six shapes; ``vlm_existence_acc`` is the accuracy
  against the scene, ``vlm_agreement_with_dense`` the fraction of answers equal to those on the dense video.

- **motion** (layout prompts only, pixels, :mod:`mmeff.eval.video_motion`): the share of objects present in the
  first, middle and last frame near where the prompt puts them, and the share that move in the named direction.

Both are averaged over prompts (mean and std in the JSON, per-prompt values too). Also reported: sampling
seconds per video (wall clock of the whole pipeline call: text encoding, denoising, VAE decode), the method's own
time, and its sparsity from ``handle.report()``: ``sparsity_sparse_calls`` (mean over layers of the fraction of
attention skipped in sparse calls) and ``sparsity_effective`` (times the share of attention calls that ran
sparse, i.e. counting dense warm-up steps / layers as 0). A reference row ``other_seed`` scores a dense video of
the same prompt with a different seed against the dense one: the gap between two unrelated samples.

Layouts (``--layout``). tiny-wan's token grid is 4 x 8 x 8 = 256 tokens, so the sparse methods' block size,
not the video, decides how much work a drop can skip:

- ``fine`` (default): every attention call after ``--warmup`` (default 1 of 10) steps runs sparse: no dense
  layers, no first-frame rule, **4-token blocks** (64 key blocks per query block) and ``tau`` 0 for the
  SpaAttn rows, so ``drop`` itself sets the kept blocks and the measured sparsity follows the requested drop;
  VMoBA rows ``vmoba_d{50,75,90}`` use 1-frame temporal chunks (4 chunks: top-2, the official top-k >= 2
  rule caps these layers at 0.5), 2 x 2 spatial tiles (16 chunks) and 1 x 2 x 2 cubes (64 chunks) with top-k
  ``round((1 - drop) * chunks)`` (at least 2).
- ``paper``: the published settings on this grid: block 16, ``tau`` 0.2, first layer dense, Wan's first-frame
  rule, ``--warmup`` 2, VMoBA ``vmoba_k2`` / ``vmoba_k1`` / ``vmoba_tau25`` below. Here 16 blocks per row, a
  dense first frame (a quarter of the rows and columns) and the tau mass floor leave drop 0.9 at about 0.53
  sparsity in sparse calls and 0.32 effective.

Methods of the ``paper`` layout (all with the same dense warm-up, ``--warmup`` steps):

- ``rectified_d{50,75,90}``: Rectified SpaAttn, ``drop`` 0.5 / 0.75 / 0.9, block 16 on the 4 x 8 x 8 grid,
  ``tau`` 0.2, first layer dense (``dense_layers=(0,)``), Wan's first-frame rule;
- ``blocksparse_d{50,75,90}``: the same block selection without rectification (``ipar=False, gapr=False``);
- ``vmoba_k2`` / ``vmoba_k1``: VMoBA top-k with chunks 1 frame / 4x4 tiles / 2x4x4 cubes, ``topk`` (2, 2, 3)
  and (1, 1, 2) (layer 0 dense, then temporal, spatial, 3-D layers by depth). As in the official code, a layer
  whose top-k is 1 routes nothing beyond the own chunks and falls back to dense attention, so ``vmoba_k1`` is
  sparse only in its 3-D layers;
- ``vmoba_tau25``: the same chunks with the official default selection, threshold ``tau`` 0.25 per (head, query).

A PNG strip (``--png``, default: next to the JSON) shows dense and every method on the first prompts at a few
frames.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..zoo.load_video import TINY_WAN_CFG

# ---------------------------------------------------------------------------------------------- metrics


def _gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM of images ``x``, ``y`` shaped ``[..., C, H, W]`` (e.g. ``[T, C, H, W]`` frames).

    Per image and channel: Gaussian-weighted local means/variances/covariance (``window`` x ``window``,
    ``sigma``), valid positions only; the SSIM map is averaged over positions and channels, then over all
    leading dims (frames). Computed in float64. ``H`` and ``W`` must be >= ``window``.
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    h, w = x.shape[-2:]
    if h < window or w < window:
        raise ValueError(f"ssim: images {h}x{w} are smaller than the {window}x{window} window")
    a = x.reshape(-1, 1, h, w).double()
    b = y.reshape(-1, 1, h, w).double()
    k = _gaussian_window(window, sigma)[None, None]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = F.conv2d(a, k), F.conv2d(b, k)
    s_aa = F.conv2d(a * a, k) - mu_a ** 2
    s_bb = F.conv2d(b * b, k) - mu_b ** 2
    s_ab = F.conv2d(a * b, k) - mu_a * mu_b
    m = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2))
    return m.mean()


def ssim_skimage(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0) -> float:
    """Mean SSIM of videos ``[T, C, H, W]`` (or images ``[C, H, W]``) with scikit-image's
    ``structural_similarity`` (Gaussian window sigma 1.5, population covariance), averaged over frames."""
    from skimage.metrics import structural_similarity

    if x.shape != y.shape:
        raise ValueError(f"ssim_skimage: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    a = x.reshape(-1, *x.shape[-3:]).double().numpy()
    b = y.reshape(-1, *y.shape[-3:]).double().numpy()
    vals = [structural_similarity(fa, fb, data_range=data_range, channel_axis=0, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False) for fa, fb in zip(a, b)]
    return float(np.mean(vals))


def psnr(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB over all elements; MSE floored at 1e-10 * data_range^2 (identical inputs -> 100 dB)."""
    mse = ((x.double() - y.double()) ** 2).mean().clamp_min(1e-10 * data_range ** 2)
    return 10 * torch.log10(data_range ** 2 / mse)


# ---------------------------------------------------------------------------------------------- methods


DROPS = (0.5, 0.75, 0.9)
LAYOUTS = ("fine", "paper")
DEFAULTS = {"fine": {"block": 4, "warmup": 1}, "paper": {"block": 16, "warmup": 2}}
"""Block size and dense warm-up steps of each layout when the caller does not set them."""


def vmoba_topk(drop: float, chunks: int) -> int:
    """Top-k chunks that keep about ``1 - drop`` of ``chunks`` (at least 2: VMoBA's top-1 routes nothing)."""
    return max(2, round((1.0 - drop) * chunks))


def fine_methods(block: int = 4, warmup: int = 1) -> dict[str, Callable[[], Any]]:
    """The ``fine`` layout: every call after the warm-up sparse, small blocks, ``drop`` sets the sparsity."""
    from ..video import RectifiedSpaAttn, VMoBA

    out: dict[str, Callable[[], Any]] = {}
    for rect, prefix in ((True, "rectified"), (False, "blocksparse")):
        for d in DROPS:
            out[f"{prefix}_d{round(d * 100)}"] = (
                lambda d=d, rect=rect: RectifiedSpaAttn(drop=d, tau=0.0, block=block, preset="none",
                                                        warmup_steps=warmup, dense_layers=(),
                                                        first_frame_dense=False, ipar=rect, gapr=rect))
    for d in DROPS:
        k = (2, vmoba_topk(d, 16), vmoba_topk(d, 64))
        out[f"vmoba_d{round(d * 100)}"] = (lambda k=k: VMoBA(temporal_chunk="1", spatial_chunk="2x2",
                                                             st_chunk="1x2x2", mode="topk", topk=k,
                                                             first_full_layer=0, warmup_steps=warmup))
    return out


def default_methods(block: int = 16, warmup: int = 2, layout: str = "paper") -> dict[str, Callable[[], Any]]:
    """Name -> factory of the method configs compared in ``layout`` (see the module docstring)."""
    from ..video import RectifiedSpaAttn, VMoBA

    if layout not in LAYOUTS:
        from ..core.errors import ConfigError

        raise ConfigError(f"video_fidelity: layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "fine":
        return fine_methods(block, warmup)

    out: dict[str, Callable[[], Any]] = {}
    for d in (0.5, 0.75, 0.9):
        tag = f"d{round(d * 100)}"
        out[f"rectified_{tag}"] = (lambda d=d: RectifiedSpaAttn(drop=d, tau=0.2, block=block, preset="none",
                                                                warmup_steps=warmup, dense_layers=(0,),
                                                                first_frame_dense=True))
    for d in (0.5, 0.75, 0.9):
        tag = f"d{round(d * 100)}"
        out[f"blocksparse_{tag}"] = (lambda d=d: RectifiedSpaAttn(drop=d, tau=0.2, block=block, preset="none",
                                                                  warmup_steps=warmup, dense_layers=(0,),
                                                                  first_frame_dense=True, ipar=False, gapr=False))
    for name, k in (("vmoba_k2", (2, 2, 3)), ("vmoba_k1", (1, 1, 2))):
        out[name] = (lambda k=k: VMoBA(temporal_chunk="1", spatial_chunk="4x4", st_chunk="2x4x4", mode="topk",
                                       topk=k, first_full_layer=1, warmup_steps=warmup))
    out["vmoba_tau25"] = lambda: VMoBA(temporal_chunk="1", spatial_chunk="4x4", st_chunk="2x4x4", mode="threshold",
                                       threshold=0.25, threshold_type="query_head", first_full_layer=1,
                                       warmup_steps=warmup)
    return out


# ---------------------------------------------------------------------------------------------- generation


def frame_presence(vlm: tuple[Any, Any], video: torch.Tensor, scene: Any,
                   frames: Sequence[int] = (0, -1)) -> list[dict[str, Any]]:
    """The VLM's existence answers (:func:`mmeff.eval.t2i_fidelity.vlm_existence`) on ``frames`` of ``video``."""
    from .t2i_fidelity import vlm_existence

    ims = [video[f].permute(1, 2, 0).numpy() for f in frames]
    return vlm_existence(*vlm, ims, [scene] * len(ims))


def _presence_scores(rows: list[dict[str, Any]], dense_rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(accuracy against the scene, agreement with the dense video's answers) of per-frame VLM rows."""
    acc = [c for r in rows for c in r["correct"].values()]
    agree = [r["answers"][k] == d["answers"][k] for r, d in zip(rows, dense_rows) for k in r["answers"]]
    return float(np.mean(acc)), float(np.mean(agree))


def prompts_and_seeds(n: int, offset: int = 0, family: str = "world") -> list[tuple[str, int]]:
    """``(prompt, seed)`` of ``n`` test-split scenes of the prompt ``family`` (layout videos name directions)."""
    from ..zoo.load_video import TINY_WAN_CALL
    from ..zoo.prompt_family import scene_of_seed, video_prompt_of
    from ..zoo.world import split_seeds

    frames = int(TINY_WAN_CALL["num_frames"])
    return [(video_prompt_of(family, scene_of_seed(family, s), frames), s) for s in split_seeds("test", n, offset)]


def generate(pipe: Any, prompt: str, seed: int, *, steps: int, cfg: float, call: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """A video ``[T, C, H, W]`` in [0, 1] and the seconds the pipeline call took."""
    t0 = time.perf_counter()
    with torch.no_grad():
        out = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=cfg,
                   generator=torch.Generator().manual_seed(seed), output_type="np", **call)
    dt = time.perf_counter() - t0
    frames = torch.as_tensor(np.asarray(out.frames[0]), dtype=torch.float32)  # T, H, W, C
    return frames.permute(0, 3, 1, 2).contiguous().clamp(0, 1), dt


def _sparsity(rep: dict[str, Any]) -> dict[str, float | None]:
    per = next(iter(rep["per_method"].values()))
    layers = list(per.get("sparsity_per_layer", {}).values())
    calls = per.get("calls", {})
    n = calls.get("sparse", 0) + calls.get("dense", 0)
    sp = float(np.mean(layers)) if layers else 0.0
    return {"sparsity_sparse_calls": sp if layers else None,
            "sparsity_effective": sp * calls.get("sparse", 0) / n if n else None,
            "sparse_calls": calls.get("sparse", 0), "dense_calls": calls.get("dense", 0),
            "method_seconds": per.get("method_seconds")}


def _stats(v: Sequence[float]) -> dict[str, float]:
    return {"mean": float(np.mean(v)), "std": float(np.std(v))}


def run_fidelity(pipe: Any, *, n: int = 8, steps: int = 10, cfg: float = TINY_WAN_CFG, warmup: int = 2, block: int = 16,
                 methods: dict[str, Callable[[], Any]] | None = None, call: dict[str, Any] | None = None,
                 offset: int = 0, keep_videos: int = 2, other_seed: bool = True, layout: str = "paper",
                 vlm: tuple[Any, Any] | None = None, vlm_frames: Sequence[int] = (0, -1),
                 log: Callable[[str], None] | None = None) -> tuple[dict[str, Any], dict[str, list[torch.Tensor]]]:
    """Dense vs sparse on ``n`` test prompts. Returns (results dict, videos of the first ``keep_videos``)."""
    import mmeff

    from ..zoo.load_video import TINY_WAN_CALL
    from ..zoo.prompt_family import pipeline_family, scene_of_seed
    from .video_motion import motion_checks, summarise_motion

    call = dict(TINY_WAN_CALL if call is None else call)
    methods = default_methods(block, warmup, layout) if methods is None else methods
    family = pipeline_family(pipe)
    items = prompts_and_seeds(n, offset, family)
    scenes = [scene_of_seed(family, s) for _, s in items]

    def motion(vs: list[torch.Tensor]) -> dict[str, Any] | None:
        return summarise_motion([motion_checks(v, sc) for v, sc in zip(vs, scenes)]) if family == "layout" else None

    videos: dict[str, list[torch.Tensor]] = {"dense": []}
    dense, dense_t = [], []
    for i, (p, s) in enumerate(items):
        v, dt = generate(pipe, p, s, steps=steps, cfg=cfg, call=call)
        dense.append(v)
        dense_t.append(dt)
        if i < keep_videos:
            videos["dense"].append(v)
    rows: dict[str, Any] = {"dense": {"seconds_per_video": _stats(dense_t), "psnr": None, "ssim": None,
                                      "motion": motion(dense)}}
    dense_vlm: list[list[dict[str, Any]]] = []
    if vlm is not None:
        dense_vlm = [frame_presence(vlm, v, sc, vlm_frames) for v, sc in zip(dense, scenes)]
        rows["dense"]["vlm_existence_acc"] = float(np.mean([c for rs in dense_vlm for r in rs
                                                            for c in r["correct"].values()]))
    if log:
        log(f"dense: {np.mean(dense_t):.2f} s/video")
    if other_seed:
        ps, ss = [], []
        for (p, s), ref in zip(items, dense):
            v, _ = generate(pipe, p, s + 7_777_777, steps=steps, cfg=cfg, call=call)
            ps.append(float(psnr(v, ref)))
            ss.append(ssim_skimage(v, ref))
        rows["other_seed"] = {"psnr": _stats(ps), "ssim": _stats(ss), "per_prompt": {"psnr": ps, "ssim": ss},
                              "note": "dense, same prompt, a different seed: the gap between unrelated samples"}
    for name, make in methods.items():
        cfg_obj = make()
        ps, ss, ts, reps, accs, agrees, made = [], [], [], [], [], [], []
        videos[name] = []
        for i, ((p, s), ref) in enumerate(zip(items, dense)):
            with mmeff.apply(pipe, cfg_obj) as h:
                v, dt = generate(pipe, p, s, steps=steps, cfg=cfg, call=call)
                reps.append(_sparsity(h.report()))
            ps.append(float(psnr(v, ref)))
            ss.append(ssim_skimage(v, ref))
            made.append(v)
            if vlm is not None:
                acc, agree = _presence_scores(frame_presence(vlm, v, scenes[i], vlm_frames), dense_vlm[i])
                accs.append(acc)
                agrees.append(agree)
            ts.append(dt)
            if i < keep_videos:
                videos[name].append(v)
        sp = [r["sparsity_sparse_calls"] for r in reps if r["sparsity_sparse_calls"] is not None]
        eff = [r["sparsity_effective"] for r in reps if r["sparsity_effective"] is not None]
        rows[name] = {
            "method": cfg_obj.spec() if hasattr(cfg_obj, "spec") else repr(cfg_obj),
            "config": cfg_obj.to_dict() if hasattr(cfg_obj, "to_dict") else None,
            "psnr": _stats(ps), "ssim": _stats(ss), "per_prompt": {"psnr": ps, "ssim": ss},
            "seconds_per_video": _stats(ts), "speedup_vs_dense": float(np.mean(dense_t) / np.mean(ts)),
            "sparsity_sparse_calls": float(np.mean(sp)) if sp else None,
            "sparsity_effective": float(np.mean(eff)) if eff else None,
            "calls_per_video": {"sparse": reps[0]["sparse_calls"], "dense": reps[0]["dense_calls"]},
            "method_seconds_per_video": float(np.mean([r["method_seconds"] or 0.0 for r in reps])),
            "motion": motion(made),
        }
        if vlm is not None:
            rows[name]["vlm_existence_acc"] = float(np.mean(accs))
            rows[name]["vlm_agreement_with_dense"] = float(np.mean(agrees))
        if log:
            r = rows[name]
            log(f"{name}: PSNR {r['psnr']['mean']:.2f} SSIM {r['ssim']['mean']:.4f} sparsity "
                f"{r['sparsity_sparse_calls']} {r['seconds_per_video']['mean']:.2f} s/video")
    info = {"prompt_family": family, "prompts": [p for p, _ in items], "seeds": [s for _, s in items],
            "results": rows}
    if vlm is not None:
        info["dense_vlm"] = dense_vlm
    return info, videos


# ---------------------------------------------------------------------------------------------- outputs


def write_strip(videos: dict[str, list[torch.Tensor]], path: str | Path, *, frames: Sequence[int] | None = None,
                scale: int = 2) -> Path:
    """PNG: one row per method (dense first) for each kept prompt, columns = a few frames."""
    from PIL import Image, ImageDraw

    names = list(videos)
    n_vid = min(len(v) for v in videos.values())
    t = videos[names[0]][0].shape[0]
    frames = list(frames) if frames is not None else sorted({0, t // 3, (2 * t) // 3, t - 1})
    h, w = videos[names[0]][0].shape[-2:]
    cw, ch = w * scale, h * scale
    label_w, pad = 110, 2
    W = label_w + len(frames) * (cw + pad)
    H = n_vid * len(names) * (ch + pad) + (n_vid - 1) * 8
    img = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    y = 0
    for k in range(n_vid):
        for name in names:
            draw.text((4, y + ch // 2 - 5), name, fill=(0, 0, 0))
            vid = videos[name][k]
            for j, f in enumerate(frames):
                arr = (vid[f].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
                tile = Image.fromarray(arr).resize((cw, ch), Image.Resampling.NEAREST)
                img.paste(tile, (label_w + j * (cw + pad), y))
            y += ch + pad
        y += 8
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def evaluate(model: Any = "tiny-wan", *, out: str | Path = "runs/video_fidelity.json", png: str | Path | None = None,
             n: int = 8, steps: int = 10, cfg: float = TINY_WAN_CFG, warmup: int | None = None, block: int | None = None,
             threads: int | None = None, methods: dict[str, Callable[[], Any]] | None = None, other_seed: bool = True,
             call: dict[str, Any] | None = None, keep_videos: int = 2, quiet: bool = False, layout: str = "fine",
             vlm: str | tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Run :func:`run_fidelity` on ``model`` (a zoo name, a folder or a loaded pipeline), write the JSON and the
    PNG strip; returns the JSON dict."""
    import diffusers
    import transformers

    from ..zoo.load_video import TINY_WAN_CALL, load_video_pipeline

    if threads:
        torch.set_num_threads(threads)
    log = None if quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    pipe = model if hasattr(model, "transformer") else load_video_pipeline(model)
    if layout not in LAYOUTS:
        from ..core.errors import ConfigError

        raise ConfigError(f"video_fidelity: layout must be one of {LAYOUTS}, got {layout!r}")
    block = DEFAULTS[layout]["block"] if block is None else block
    warmup = DEFAULTS[layout]["warmup"] if warmup is None else warmup
    vlm_name = vlm if isinstance(vlm, str) else (None if vlm is None else type(vlm[0]).__name__)
    if isinstance(vlm, str):
        from ..zoo.load import load

        vlm = load(vlm)
    t0 = time.perf_counter()
    call = dict(TINY_WAN_CALL if call is None else call)
    res, videos = run_fidelity(pipe, n=n, steps=steps, cfg=cfg, warmup=warmup, block=block, methods=methods,
                               call=call, other_seed=other_seed, keep_videos=keep_videos, layout=layout, vlm=vlm,
                               log=log)
    out = Path(out)
    png = Path(png) if png is not None else out.with_suffix(".png")
    write_strip(videos, png)
    doc = {
        "format": "mmeff.video_fidelity/1",
        "config": {"model": str(model) if isinstance(model, (str, Path)) else type(model).__name__, "n_prompts": n, "split": "test", "steps": steps, "guidance_scale": cfg,
                   "warmup_steps": warmup, "block": block, "call": call, "layout": layout, "vlm": vlm_name,
                   "vlm_frames": "first and last frame" if vlm_name else None,
                   "methods": {k: v.get("method") for k, v in res["results"].items() if "method" in v},
                   "metrics": "PSNR (dB, [0,1], MSE floor 1e-10) and SSIM (skimage structural_similarity, "
                              "gaussian sigma 1.5, population covariance, per frame over RGB, averaged) of each "
                              "sparse video vs the dense video of the same prompt/seed/steps",
                   "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "device": "cpu"},
        "total_seconds": time.perf_counter() - t0,
        "png": str(png),
        **res,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def table(doc: dict[str, Any]) -> str:
    """A markdown table of a results JSON."""
    rows = doc["results"]
    dense_t = rows["dense"]["seconds_per_video"]["mean"]
    has_vlm = "vlm_existence_acc" in rows["dense"]
    has_motion = bool(rows["dense"].get("motion"))
    vlm_head = " VLM existence | VLM = dense |" if has_vlm else ""
    dense_vlm = f" {rows['dense']['vlm_existence_acc']:.3f} | 1.000 |" if has_vlm else ""

    def motion_cells(r: dict[str, Any]) -> str:
        m = r.get("motion")
        return "" if not has_motion else (" - | - |" if not m else
                                          f" {m['object_persists']:.3f} | {m['object_moves_as_named']:.3f} |")

    lines = ["| method | PSNR (dB) | SSIM | sparsity (sparse calls) | sparsity (effective) | s/video | speed-up |"
             + vlm_head + (" objects persist | move as named |" if has_motion else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|" if has_vlm else "") + ("---|---|" if has_motion else ""),
             f"| dense | - | - | 0 | 0 | {dense_t:.2f} | 1.00 |" + dense_vlm + motion_cells(rows["dense"])]
    for name, r in rows.items():
        if name == "dense":
            continue
        sp, eff, sec = r.get("sparsity_sparse_calls"), r.get("sparsity_effective"), r.get("seconds_per_video")
        spd = r.get("speedup_vs_dense")
        cells = [name, f"{r['psnr']['mean']:.2f} ± {r['psnr']['std']:.2f}",
                 f"{r['ssim']['mean']:.4f} ± {r['ssim']['std']:.4f}",
                 "-" if sp is None else f"{sp:.3f}", "-" if eff is None else f"{eff:.3f}",
                 "-" if sec is None else f"{sec['mean']:.2f}", "-" if spd is None else f"{spd:.2f}"]
        if has_vlm:
            cells += [f"{r['vlm_existence_acc']:.3f}" if "vlm_existence_acc" in r else "-",
                      f"{r['vlm_agreement_with_dense']:.3f}" if "vlm_agreement_with_dense" in r else "-"]
        lines.append("| " + " | ".join(cells) + " |" + motion_cells(r))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-wan", help='zoo name ("tiny-wan") or a pipeline folder')
    ap.add_argument("--out", default="runs/video_fidelity.json")
    ap.add_argument("--png", default=None, help="PNG strip path (default: the JSON path with .png)")
    ap.add_argument("--n", type=int, default=8, help="held-out prompts")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=TINY_WAN_CFG, help="guidance scale (tiny-wan's, chosen on val prompts)")
    ap.add_argument("--layout", choices=LAYOUTS, default="fine", help="method settings (see the module docstring)")
    ap.add_argument("--warmup", type=int, default=None, help="dense warm-up steps (default: the layout's)")
    ap.add_argument("--block", type=int, default=None, help="SpaAttn block size in tokens (default: the layout's)")
    ap.add_argument("--vlm", default="tiny-qwen2-vl", help="zoo VLM for presence on frames ('none' to skip)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-other-seed", action="store_true", help="skip the different-seed reference row")
    a = ap.parse_args(argv)
    doc = evaluate(a.model, out=a.out, png=a.png, n=a.n, steps=a.steps, cfg=a.cfg, warmup=a.warmup, block=a.block,
                   threads=a.threads, other_seed=not a.no_other_seed, layout=a.layout,
                   vlm=None if a.vlm == "none" else a.vlm)
    print(table(doc))
    print(f"wrote {a.out} and {doc['png']}")


if __name__ == "__main__":
    main()
