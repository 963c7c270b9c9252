"""Does a text-to-image pipeline draw what it is told? Held-out shapes-world prompts, judged two ways.

``python -m mmeff.eval.t2i_fidelity --pipe tiny-sd3 --n 48 --out docs/results/tiny-sd3-prompt-fidelity.json``

For ``n`` *test*-split scenes (never trained on) the pipeline draws the scene's prompt with generator seed =
scene seed. Scenes and prompts are of the pipeline's prompt family (:mod:`mmeff.zoo.prompt_family`): layout
scenes with prompts that name every object's cell for a ``layout`` pipeline, world scenes with ``make_prompt``
otherwise. Each image is scored, and so is the world's own render of the scene at the same size (the ceiling):

- **shape existence** (zoo VLM, default ``tiny-qwen2-vl``): "Is there a <shape> in the image?" for all six shapes
  (present ones should be answered "yes", absent ones "no"); accuracy over all questions, plus the yes-rate on
  present and absent shapes, so a model that says "yes" to everything cannot look good.
- **colours** (pixels, no model): the *background* is correct when the median colour of the outer ring of
  pixels is nearest to the named background; a *named object colour* is present when at least
  :func:`min_colour_pixels` pixels are within :data:`COLOUR_TOLERANCE` of that palette colour and nearer to it
  than to any other palette or background colour. ``all_colours_ok`` = background and every named colour.
- **VAE round trip**: the renders encoded and decoded by the pipeline's own VAE, scored the same way. That is
  the ceiling of any transformer trained on the VAE's latents.
- **positions** (layout prompts only, pixels): an object is in place when its colour's pixels (same test, same
  count) lie inside the grid cell its prompt names; ``all_positions_ok`` = every object of the image.

Writes the JSON (config, versions, per-prompt rows, summary for generated images and renders) and
``<out stem>_grid.png`` (generated row above the render row for every prompt).
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

COLOUR_TOLERANCE = 60.0
"""Largest RGB distance (0-255 scale) at which a pixel counts as a palette colour."""


def to_uint8(image: Any) -> np.ndarray:
    """HWC uint8 array from a PIL image, or a float array in [0, 1], or a uint8 array."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return arr[..., :3]


def min_colour_pixels(size: int) -> int:
    """Pixels a named colour needs: a quarter of a small circle's area at this size (at least 3)."""
    from ..zoo.world import SIZES

    r = SIZES["small"] * size
    return max(3, int(0.25 * np.pi * r * r))


def palette() -> tuple[list[str], np.ndarray]:
    """The world's object colours then backgrounds: names and ``[N, 3]`` RGB."""
    from ..zoo.world import BACKGROUNDS, COLOURS

    names = list(COLOURS) + list(BACKGROUNDS)
    return names, np.array([COLOURS.get(n) or BACKGROUNDS[n] for n in names], dtype=np.float64)


def colour_mask(pixels: np.ndarray, colour: str) -> np.ndarray:
    """``pixels[..., 3]`` (0-255) -> bool: nearest to ``colour`` among the palette, within
    :data:`COLOUR_TOLERANCE`."""
    names, pal = palette()
    dist = np.linalg.norm(pixels[..., None, :].astype(np.float64) - pal, axis=-1)
    return (dist.argmin(-1) == names.index(colour)) & (dist.min(-1) <= COLOUR_TOLERANCE)


def colour_checks(image: Any, scene: Any) -> dict[str, Any]:
    """Background and named-colour presence of one image against the scene it should show."""
    from ..zoo.world import BACKGROUNDS

    arr = to_uint8(image).astype(np.float64)
    h, w = arr.shape[:2]
    ring = np.concatenate([arr[:2].reshape(-1, 3), arr[-2:].reshape(-1, 3), arr[:, :2].reshape(-1, 3),
                           arr[:, -2:].reshape(-1, 3)])
    median = np.median(ring, axis=0)
    bg_names = list(BACKGROUNDS)
    bg_pred = bg_names[int(np.argmin([np.linalg.norm(median - np.array(BACKGROUNDS[b])) for b in bg_names]))]
    need = min_colour_pixels(min(h, w))
    named = sorted({o.colour for o in scene.objects})
    counts = {c: int(colour_mask(arr, c).sum()) for c in named}
    present = {c: counts[c] >= need for c in named}
    return {"background": scene.background, "background_pred": bg_pred,
            "background_ok": bg_pred == scene.background, "colours": present, "colour_pixels": counts,
            "all_colours_ok": bg_pred == scene.background and all(present.values())}


def position_checks(image: Any, scene: Any) -> dict[str, Any]:
    """Per object of a layout scene: are at least :func:`min_colour_pixels` pixels of its colour inside the
    grid cell its prompt names? Objects are in distinct cells, so each cell is checked for its own object."""
    from ..zoo.world.layout import CELL_PHRASES, GRID, cell_of

    arr = to_uint8(image).astype(np.float64)
    h, w = arr.shape[:2]
    need = min_colour_pixels(min(h, w))
    rows = []
    for o in scene.objects:
        cx, cy = cell_of(o)
        cell = arr[cy * h // GRID:(cy + 1) * h // GRID, cx * w // GRID:(cx + 1) * w // GRID]
        n = int(colour_mask(cell, o.colour).sum())
        rows.append({"object": f"{o.colour} {o.shape}", "cell": CELL_PHRASES[(cx, cy)], "pixels": n, "ok": n >= need})
    return {"objects": rows, "all_positions_ok": all(r["ok"] for r in rows)}


def existence_questions(scene: Any) -> list[tuple[str, str, str]]:
    """``(shape, question, answer)`` for all six shapes (the world's exhaustive existence drill)."""
    from ..zoo.world import SHAPES

    present = scene.shapes()
    return [(s, f"Is there a {s} in the image?", "yes" if s in present else "no") for s in SHAPES]


def vlm_existence(model: Any, processor: Any, images: Sequence[Any], scenes: Sequence[Any]) -> list[dict[str, Any]]:
    """Per image: the VLM's answers to :func:`existence_questions` and whether each is right."""
    from PIL import Image

    from ..zoo.eval_dense import answer_shared_image, normalise

    rows = []
    for image, scene in zip(images, scenes):
        pil = image if isinstance(image, Image.Image) else Image.fromarray(to_uint8(image))
        qs = existence_questions(scene)
        preds = answer_shared_image(model, processor, pil, [q for _, q, _ in qs], max_new_tokens=3)
        rows.append({"answers": {s: normalise(p) for (s, _, _), p in zip(qs, preds)},
                     "correct": {s: normalise(p) == a for (s, _, a), p in zip(qs, preds)},
                     "present": sorted(scene.shapes())})
    return rows


def per_shape_rates(vlm_rows: list[dict[str, Any]]) -> dict[str, dict[str, float | int]]:
    """Per shape: how often the VLM says yes when it is drawn (``recall``) and when it is not (``false_yes``).

    Why: one accuracy hides *how* a generator fails. A generator that draws round blobs for every shape shows
    as circle ``false_yes`` high and square/cross ``recall`` low."""
    out: dict[str, dict[str, float | int]] = {}
    for shape in sorted({s for r in vlm_rows for s in r["answers"]}):
        drawn = [r["answers"][shape] == "yes" for r in vlm_rows if shape in r["answers"] and shape in r["present"]]
        absent = [r["answers"][shape] == "yes" for r in vlm_rows
                  if shape in r["answers"] and shape not in r["present"]]
        out[shape] = {"recall": float(np.mean(drawn)) if drawn else float("nan"),
                      "false_yes": float(np.mean(absent)) if absent else float("nan"),
                      "n_drawn": len(drawn), "n_absent": len(absent)}
    return out


def summarise(vlm_rows: list[dict[str, Any]], colour_rows: list[dict[str, Any]],
              position_rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Aggregate :func:`vlm_existence`, :func:`colour_checks` and (layout prompts) :func:`position_checks` rows."""
    correct = [c for r in vlm_rows for c in r["correct"].values()]
    yes_present = [r["answers"][s] == "yes" for r in vlm_rows for s in r["answers"] if s in r["present"]]
    yes_absent = [r["answers"][s] == "yes" for r in vlm_rows for s in r["answers"] if s not in r["present"]]
    named = [ok for r in colour_rows for ok in r["colours"].values()]
    return {
        "shape_existence_acc": float(np.mean(correct)) if correct else float("nan"),
        "yes_rate_present": float(np.mean(yes_present)) if yes_present else float("nan"),
        "yes_rate_absent": float(np.mean(yes_absent)) if yes_absent else float("nan"),
        "background_ok": float(np.mean([r["background_ok"] for r in colour_rows])),
        "named_colour_present": float(np.mean(named)) if named else float("nan"),
        "all_colours_ok": float(np.mean([r["all_colours_ok"] for r in colour_rows])),
        "n_images": len(colour_rows), "n_questions": len(correct),
    } | ({"per_shape": per_shape_rates(vlm_rows)} if vlm_rows else {}) | ({} if not position_rows else {
        "object_in_named_cell": float(np.mean([o["ok"] for r in position_rows for o in r["objects"]])),
        "all_positions_ok": float(np.mean([r["all_positions_ok"] for r in position_rows]))})


def vae_round_trip(pipe: Any, images: Sequence[Any]) -> list[np.ndarray]:
    """The images encoded (posterior mean) and decoded by the pipeline's VAE: the best a transformer on its
    latents could draw (HWC float arrays in [0, 1])."""
    vae = pipe.vae
    x = torch.stack([torch.from_numpy(to_uint8(im).copy()).permute(2, 0, 1) for im in images]).float() / 127.5 - 1.0
    x = x.to(device=vae.device, dtype=vae.dtype)
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return [((r.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy() for r in rec]


def pipe_call_kwargs(pipe: Any) -> dict[str, Any]:
    """Height/width the pipeline was trained at (its VAE's ``sample_size``) and the zoo's text length."""
    from ..zoo.load_pipeline import TINY_SD3_CALL

    size = int(pipe.vae.config.sample_size)
    return {**TINY_SD3_CALL, "height": size, "width": size}


def evaluate(pipe: Any, vlm: tuple[Any, Any] | None, scenes: Sequence[Any], *, steps: int = 20, cfg: float = 4.0,
             batch_size: int = 8, config: Any = None, family: str | None = None) -> dict[str, Any]:
    """Generate the scenes' prompts (of ``family``, by default the pipeline's) and score generated images and
    renders (``vlm=None``: colours only; positions for layout prompts)."""
    from ..zoo.prompt_family import pipeline_family, prompt_of
    from ..zoo.world import render
    from .guidance_eval import generate

    family = family or pipeline_family(pipe)
    call = {**pipe_call_kwargs(pipe), "num_inference_steps": steps, "guidance_scale": cfg}
    prompts, seeds = [prompt_of(family, s) for s in scenes], [s.seed for s in scenes]
    images, spi = generate(pipe, prompts, seeds, config, call, batch_size)
    renders = [render(s, size=call["height"]) for s in scenes]
    round_trips = vae_round_trip(pipe, renders)
    out: dict[str, Any] = {"call_kwargs": call, "sec_per_image": spi, "prompt_family": family, "prompts": prompts,
                           "seeds": seeds}
    for name, ims in (("generated", images), ("renders", renders), ("vae_round_trip", round_trips)):
        colours = [colour_checks(im, s) for im, s in zip(ims, scenes)]
        positions = [position_checks(im, s) for im, s in zip(ims, scenes)] if family == "layout" else []
        vrows = vlm_existence(*vlm, ims, scenes) if vlm is not None else []
        out[name] = {"summary": summarise(vrows, colours, positions), "colours": colours, "vlm": vrows}
        if positions:
            out[name]["positions"] = positions
    out["images"] = images
    out["render_images"] = [np.asarray(r, dtype=np.float32) / 255.0 for r in renders]
    return out


def main(argv: list[str] | None = None) -> None:
    from ..zoo.load import load
    from ..zoo.load_pipeline import load_pipeline
    from ..zoo.prompt_family import FAMILIES, held_out_scenes, pipeline_family
    from .guidance_eval import save_grid, versions

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipe", default="tiny-sd3", help="zoo name or a saved pipeline folder")
    ap.add_argument("--vlm", default="tiny-qwen2-vl")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--split", choices=["test", "val"], default="test",
                    help="held-out split (choose settings such as --cfg on val, report on test)")
    ap.add_argument("--family", choices=FAMILIES, default=None, help="prompt family (default: the pipeline's)")
    ap.add_argument("--out", type=Path, default=Path("runs/t2i_fidelity.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    pipe = load_pipeline(a.pipe)
    model, processor = load(a.vlm)
    family = a.family or pipeline_family(pipe)
    scenes = held_out_scenes(family, a.split, a.n)
    res = evaluate(pipe, (model, processor), scenes, steps=a.steps, cfg=a.cfg, family=family)
    images, renders = res.pop("images"), res.pop("render_images")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    cols = min(16, a.n)
    rows: dict[str, list[np.ndarray]] = {}
    for i in range(0, min(a.n, 32), cols):
        rows[f"gen {i}-{i + cols - 1}"] = images[i:i + cols]
        rows[f"render {i}-{i + cols - 1}"] = renders[i:i + cols]
    grid = save_grid(a.out.with_name(a.out.stem + "_grid.png"), rows, scale=2)
    sd3_info = None
    folder = Path(pipe.config._name_or_path) if getattr(pipe.config, "_name_or_path", None) else None
    if folder is not None and (folder / "training.json").is_file():
        sd3_info = json.loads((folder / "training.json").read_text())
    report = {"format": "mmeff.t2i_fidelity/1",
              "config": {"pipe": str(a.pipe), "vlm": a.vlm, "n": a.n, "split": a.split, "prompt_family": family,
                         "steps": a.steps, "cfg": a.cfg,
                         "colour_tolerance": COLOUR_TOLERANCE, "threads": a.threads},
              "targets": {"shape_existence_acc": 0.85, "all_colours_ok": 0.90},
              "pipe_training": None if sd3_info is None else {
                  k: sd3_info.get(k) for k in ("recipe", "image_size", "latent_shape", "budget_minutes")}
              | {"diffusion_steps": (sd3_info or {}).get("diffusion", {}).get("steps")},
              "versions": versions(), "grid": str(grid), "seconds": round(time.time() - t0, 1), **res}
    a.out.write_text(json.dumps(report, indent=1) + "\n")
    for name in ("generated", "renders", "vae_round_trip"):
        print(name, json.dumps(report[name]["summary"]))
    print(f"wrote {a.out} and {grid}")


if __name__ == "__main__":
    main()
