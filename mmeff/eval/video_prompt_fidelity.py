"""Does a text-to-video pipeline draw what it is told? Held-out prompts, judged per frame (issue 19's targets).

``python -m mmeff.eval.video_prompt_fidelity --model tiny-wan --n 48 --out docs/results/tiny-wan-prompt-fidelity.json``

The video counterpart of :mod:`mmeff.eval.t2i_fidelity`. For ``n`` *test*-split (or ``--split val``) scenes the pipeline draws the
scene's video prompt (of the pipeline's prompt family; layout prompts name every object's cell and direction)
with generator seed = scene seed. The first, middle and last frames are scored against the scene *at that
frame* (objects move), and so are the world's own video of the scene (the ceiling) and that video through the
pipeline's VAE (the ceiling of any transformer on its latents):

- **shape existence** (zoo VLM): :func:`mmeff.eval.t2i_fidelity.vlm_existence` on each checked frame;
- **colours**: :func:`mmeff.eval.t2i_fidelity.colour_checks` on each checked frame (also per frame index, since
  the causal VAE encodes the first frame alone);
- **positions** (layout): :func:`mmeff.eval.t2i_fidelity.position_checks` on the first frame, the one the prompt's
  cells describe;
- **motion** (layout): :func:`mmeff.eval.video_motion.motion_checks`: objects persist and move as named.

Writes the JSON (config, versions, per-prompt rows, summaries) and ``<out stem>_grid.png`` (per prompt: the
generated frames above the world's frames).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..zoo.load_video import TINY_WAN_CFG

GRID_FRAMES = (0, 4, 8, 12)
"""Frames shown per video in the grid PNG."""


def checked_frames(t_count: int) -> list[int]:
    """First, middle and last frame (what :func:`mmeff.eval.video_motion.motion_checks` checks too)."""
    return sorted({0, t_count // 2, t_count - 1})


def reference_videos(seeds: list[int], family: str, frames: int, size: int) -> tuple[list[np.ndarray], list[list[Any]]]:
    """The world's own videos (``[T, H, W, 3]`` float in [0, 1]) and per-frame scenes of ``seeds``."""
    from ..zoo.train_wan import video_frames_and_prompt, world_video_arrays

    arr, _ = world_video_arrays(seeds, size=size, frames=frames, data=family)
    per_frame = [video_frames_and_prompt(s, frames, family)[0] for s in seeds]
    return [a.astype(np.float32) / 255.0 for a in arr], per_frame


def vae_round_trip_videos(pipe: Any, videos: list[np.ndarray]) -> list[np.ndarray]:
    """``videos`` encoded (posterior mean) and decoded by the pipeline's VAE."""
    vae = pipe.vae
    out = []
    with torch.no_grad():
        for v in videos:
            x = torch.from_numpy(v).permute(3, 0, 1, 2)[None].to(device=vae.device, dtype=vae.dtype) * 2 - 1
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample[0]
            out.append(((rec.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).cpu().numpy())
    return out


def score(videos: list[np.ndarray], per_frame: list[list[Any]], family: str,
          vlm: tuple[Any, Any] | None) -> dict[str, Any]:
    """Per-frame VLM existence and colours, first-frame positions and motion of ``videos`` against their scenes."""
    from .t2i_fidelity import colour_checks, position_checks, summarise, vlm_existence
    from .video_motion import motion_checks, summarise_motion

    frames = checked_frames(len(videos[0]))
    colours = {f: [colour_checks(v[f], pf[f]) for v, pf in zip(videos, per_frame)] for f in frames}
    vlm_rows = {f: vlm_existence(*vlm, [v[f] for v in videos], [pf[f] for pf in per_frame]) if vlm else []
                for f in frames}
    layout = family == "layout"
    positions = [position_checks(v[0], pf[0]) for v, pf in zip(videos, per_frame)] if layout else []
    summary = summarise([r for f in frames for r in vlm_rows[f]], [r for f in frames for r in colours[f]], None)
    summary["frames_checked"] = frames
    summary["all_colours_ok_by_frame"] = {str(f): float(np.mean([r["all_colours_ok"] for r in colours[f]]))
                                          for f in frames}
    if vlm:
        summary["shape_existence_by_frame"] = {str(f): float(np.mean([c for r in vlm_rows[f]
                                                                      for c in r["correct"].values()]))
                                               for f in frames}
    out: dict[str, Any] = {"summary": summary, "colours": {str(f): colours[f] for f in frames},
                           "vlm": {str(f): vlm_rows[f] for f in frames}}
    if layout:
        motion = [motion_checks(v, pf[0]) for v, pf in zip(videos, per_frame)]
        summary["first_frame_object_in_named_cell"] = float(np.mean([o["ok"] for r in positions
                                                                     for o in r["objects"]]))
        summary["motion"] = summarise_motion(motion)
        out["positions"] = positions
        out["motion"] = motion
    return out


def evaluate(pipe: Any, vlm: tuple[Any, Any] | None, *, n: int = 48, steps: int = 10, cfg: float = TINY_WAN_CFG,
             offset: int = 0, split: str = "test", log: Any = print) -> dict[str, Any]:
    """Generate ``n`` held-out video prompts (``split``: ``"test"``, or ``"val"`` to choose settings) and score
    them, the world's videos and their VAE round trips."""
    from ..zoo.load_video import TINY_WAN_CALL
    from ..zoo.prompt_family import pipeline_family, scene_of_seed, video_prompt_of
    from ..zoo.world import split_seeds
    from .video_fidelity import generate

    family = pipeline_family(pipe)
    call = dict(TINY_WAN_CALL)
    frames = int(call["num_frames"])
    items = [(video_prompt_of(family, scene_of_seed(family, s), frames), s) for s in split_seeds(split, n, offset)]
    seeds = [s for _, s in items]
    generated, secs = [], []
    for i, (prompt, seed) in enumerate(items):
        v, dt = generate(pipe, prompt, seed, steps=steps, cfg=cfg, call=call)
        generated.append(v.permute(0, 2, 3, 1).numpy())
        secs.append(dt)
        if log and (i + 1) % 8 == 0:
            log(f"generated {i + 1}/{n} ({np.mean(secs):.2f} s/video)")
    renders, per_frame = reference_videos(seeds, family, frames, int(call["height"]))
    round_trips = vae_round_trip_videos(pipe, renders)
    out: dict[str, Any] = {"call_kwargs": {**call, "num_inference_steps": steps, "guidance_scale": cfg},
                           "split": split, "sec_per_video": float(np.mean(secs)), "prompt_family": family,
                           "prompts": [p for p, _ in items], "seeds": seeds}
    for name, vids in (("generated", generated), ("renders", renders), ("vae_round_trip", round_trips)):
        out[name] = score(vids, per_frame, family, vlm)
        if log:
            log(f"{name}: {json.dumps(out[name]['summary'])}")
    out["videos"] = {"generated": generated, "renders": renders}
    return out


def write_grid(videos: dict[str, list[np.ndarray]], path: Path, k: int = 8) -> None:
    """Per prompt (up to ``k``): generated frames :data:`GRID_FRAMES` above the world's frames."""
    from PIL import Image

    gen, ren = videos["generated"][:k], videos["renders"][:k]
    h, w = gen[0].shape[1:3]
    pad = 2
    cols = len(GRID_FRAMES)
    canvas = np.ones((len(gen) * (2 * h + 3 * pad), cols * (w + pad), 3), dtype=np.float32)
    for i, (g, r) in enumerate(zip(gen, ren)):
        y = i * (2 * h + 3 * pad)
        for j, f in enumerate(GRID_FRAMES):
            x = j * (w + pad)
            canvas[y:y + h, x:x + w] = g[f]
            canvas[y + h + pad:y + 2 * h + pad, x:x + w] = r[f]
    Image.fromarray((canvas.clip(0, 1) * 255).astype(np.uint8)).resize(
        (canvas.shape[1] * 2, canvas.shape[0] * 2), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-wan", help='zoo name ("tiny-wan") or a pipeline folder')
    ap.add_argument("--out", default="runs/video_prompt_fidelity.json")
    ap.add_argument("--n", type=int, default=48, help="held-out prompts")
    ap.add_argument("--offset", type=int, default=0, help="first scene of the split")
    ap.add_argument("--split", choices=["test", "val"], default="test",
                    help="held-out split (choose settings such as --cfg on val, report on test)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=TINY_WAN_CFG, help="guidance scale (tiny-wan's, chosen on val prompts)")
    ap.add_argument("--vlm", default="tiny-qwen2-vl", help="zoo VLM for shape existence ('none' to skip)")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.n < 1:
        ap.error("--n must be at least 1 (held-out prompts to generate)")
    from ..zoo.load import load
    from ..zoo.load_video import load_video_pipeline
    from .guidance_eval import versions

    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    pipe = load_video_pipeline(a.model)
    vlm = None if a.vlm == "none" else load(a.vlm)
    res = evaluate(pipe, vlm, n=a.n, steps=a.steps, cfg=a.cfg, offset=a.offset, split=a.split)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid = out.with_name(out.stem + "_grid.png")
    write_grid(res.pop("videos"), grid)
    folder = Path(getattr(pipe.config, "_name_or_path", "") or ".")
    meta = json.loads((folder / "training.json").read_text()) if (folder / "training.json").is_file() else {}
    doc = {"format": "mmeff.video_prompt_fidelity/1", "config": vars(a),
           "targets": {"shape_existence_acc": 0.85, "all_colours_ok": 0.90, "motion": "objects persist and move"},
           "pipe_training": {"prompt_family": meta.get("prompt_family"),
                             "diffusion_steps": meta.get("diffusion", {}).get("steps"),
                             "total_minutes": meta.get("total_minutes")},
           "versions": versions(), "seconds": round(time.time() - t0, 1), "grid": str(grid), **res}
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(json.dumps(res["generated"]["summary"], indent=1))
    print(f"wrote {out} and {grid}")


if __name__ == "__main__":
    main()
