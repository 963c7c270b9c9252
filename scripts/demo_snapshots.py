"""What the demo's diffusion tabs show, as labelled PNGs (no browser needed).

Calls the demo's own tab callbacks, :func:`mmeff.demo.app.on_guidance_run` and
:func:`mmeff.demo.app.on_video_run` (what the "generate" buttons run, with the tabs' default method, seed and
steps), on the shipped tiny-sd3 / tiny-wan, for the tab's default prompt and a few held-out prompts. Each row
shows the prompt, the world's own render of that scene (what the prompt describes), the images or frames the tab
would show, and the tab's info line.

    python scripts/demo_snapshots.py --out docs/results --prompts 3 --threads 1

Writes ``demo-diffusion-tab.png``, ``demo-video-tab.png`` and ``demo-snapshots.json`` (prompts, seeds, info lines,
config, versions).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

CELL = 128
PAD = 4
TEXT_H = 30


def scenes_for(model: str, n: int) -> tuple[str, list[Any]]:
    """``model``'s prompt family, the tab's default scene (seed 5) and ``n - 1`` held-out test scenes of it."""
    from mmeff.zoo.load_pipeline import MODELS_DIR
    from mmeff.zoo.prompt_family import folder_family, held_out_scenes, scene_of_seed

    family = folder_family(MODELS_DIR / model)
    return family, [scene_of_seed(family, 5), *held_out_scenes(family, "test", max(0, n - 1))]


def video_prompt_and_frames(family: str, scene: Any, frames: int = 13) -> tuple[str, list[Any]]:
    """The video tab's prompt for ``scene`` and the world's own rendering of it (64 px)."""
    from mmeff.zoo.prompt_family import video_prompt_of
    from mmeff.zoo.world import render, render_video
    from mmeff.zoo.world.layout import layout_video_scenes

    prompt = video_prompt_of(family, scene, frames)
    if family == "layout":
        return prompt, [render(f, size=64) for f in layout_video_scenes(scene, frames)[0]]
    return prompt, render_video(scene, frames, seed=scene.seed, size=64)


def _wrap(text: str, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return [*lines, line] if line else lines


def _tile(img: Any) -> Image.Image:
    im = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
    return im.convert("RGB").resize((CELL, CELL), Image.NEAREST)


def sheet(title: str, rows: list[dict[str, Any]], headers: list[str]) -> Image.Image:
    """One row per prompt: the prompt and info text on top, then labelled image cells."""
    ncol = max(len(r["cells"]) for r in rows)
    width = max(ncol * (CELL + PAD) + PAD, 700)
    row_h = TEXT_H + 14 + CELL + 30 + PAD
    out = Image.new("RGB", (width, 24 + 14 + len(rows) * row_h), (255, 255, 255))
    d = ImageDraw.Draw(out)
    d.text((PAD, 4), title, fill=(0, 0, 0))
    for j, h in enumerate(headers):
        d.text((PAD + j * (CELL + PAD), 24), h, fill=(90, 90, 90))
    for i, r in enumerate(rows):
        y = 38 + i * row_h
        d.text((PAD, y), "\n".join(_wrap("prompt: " + r["prompt"], width // 6)[:2]), fill=(0, 0, 160))
        for j, cell in enumerate(r["cells"]):
            out.paste(_tile(cell), (PAD + j * (CELL + PAD), y + TEXT_H + 14))
        info = r["info"].replace("**", "")
        d.text((PAD, y + TEXT_H + 14 + CELL + 2), "\n".join(_wrap(info, width // 6)[:2]), fill=(60, 60, 60))
    return out


def main(argv: list[str] | None = None) -> None:
    from mmeff.demo import app
    from mmeff.demo.diffusion_compare import DEFAULT_GUIDANCE, DEFAULT_VIDEO
    from mmeff.eval.guidance_eval import versions
    from mmeff.zoo.prompt_family import prompt_of
    from mmeff.zoo.world import render

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="the tabs' default")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    g_family, g_scenes = scenes_for("tiny-sd3", a.prompts)
    v_family, v_scenes = scenes_for("tiny-wan", a.prompts)
    g_rows, v_rows, record = [], [], []
    for sc, vsc in zip(g_scenes, v_scenes):
        prompt, seed = prompt_of(g_family, sc), sc.seed
        base, guided, g_info = app.on_guidance_run(prompt, seed, DEFAULT_GUIDANCE, a.steps)
        if base is None:
            raise RuntimeError(f"the guidance tab failed: {g_info}")
        g_rows.append({"prompt": prompt, "cells": [render(sc, size=64), base, guided], "info": g_info})
        v_prompt, frames = video_prompt_and_frames(v_family, vsc)
        dense, sparse, v_info = app.on_video_run(v_prompt, vsc.seed, DEFAULT_VIDEO, a.steps)
        if not dense:
            raise RuntimeError(f"the video tab failed: {v_info}")
        picks = np.linspace(0, 12, num=len(dense)).round().astype(int)
        v_rows.append({"prompt": v_prompt, "cells": [frames[int(p)] for p in picks] + [*dense, *sparse],
                       "info": v_info})
        record.append({"prompt": prompt, "seed": seed, "guidance_info": g_info, "video_prompt": v_prompt,
                       "video_seed": vsc.seed, "video_info": v_info, "video_frames_shown": picks.tolist()})
        print(f"{prompt}\n  {g_info}\n{v_prompt}\n  {v_info}", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    g_path, v_path = a.out / "demo-diffusion-tab.png", a.out / "demo-video-tab.png"
    sheet(f"Demo tab 'Perturbation guidance (tiny-sd3)': {DEFAULT_GUIDANCE}, {a.steps} steps", g_rows,
          ["render (truth)", "CFG", "CFG + method"]).save(g_path)
    n = len(v_rows[0]["cells"]) // 3
    sheet(f"Demo tab 'Video sparse attention (tiny-wan)': {DEFAULT_VIDEO}, {a.steps} steps", v_rows,
          [*[f"render {i}" for i in range(n)], *[f"dense {i}" for i in range(n)],
           *[f"sparse {i}" for i in range(n)]]).save(v_path)
    doc = {"format": "mmeff.demo_snapshots/1",
           "config": {"prompts": a.prompts, "steps": a.steps, "threads": a.threads, "guidance": DEFAULT_GUIDANCE,
                      "prompt_families": {"tiny-sd3": g_family, "tiny-wan": v_family},
                      "video": DEFAULT_VIDEO, "callbacks": ["mmeff.demo.app.on_guidance_run",
                                                            "mmeff.demo.app.on_video_run"]},
           "versions": versions(), "seconds": round(time.time() - t0, 1), "rows": record,
           "images": [str(g_path), str(v_path)]}
    (a.out / "demo-snapshots.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {g_path}, {v_path}")


if __name__ == "__main__":
    main()
