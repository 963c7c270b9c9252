"""Continue tiny-sd3 and tiny-wan on one GPU in a single timed call; the CPU trainers resume what it writes.

``python -m mmeff.zoo.train_gpu --out $OUT --seconds 450`` (what ``scripts/gpu_train_diffusion.sh`` runs on a
lent H200) does, in order, each step under a wall-clock deadline so the call ends before ``--seconds``:

1. **tiny-sd3**: ``train_sd3.train`` from the shipped model (a new stage: fresh AdamW warm-up, cosine decay over
   this stage), 64px recipe, batch 256, bf16 autocast, a latent pool of 65536 scenes rendered by the machine's
   CPU cores in bulk; then the checkpoint (with the run's ``training.json``) is packed into
   ``$OUT/tiny-sd3.tar.NN`` (:mod:`mmeff.zoo.bundle`; the exported weights are re-made from it on unpacking).
2. **tiny-wan**: ``train_wan.train`` from the shipped model: 60 s more VAE on full 13-frame clips (object
   pixels weighted 9x, as sd3's 64px VAE) plus 32 one-frame clips a step, then joint image-video diffusion
   (video steps at batch 64, every other step 256 one-frame latents) with EMA, cosine lr, bf16 autocast and a
   pool of 16384 videos; packed into ``$OUT/tiny-wan.tar.NN``.
3. **quick fidelity**, shipped vs new on the same held-out prompts: tiny-sd3 on 16 test prompts
   (``mmeff.eval.t2i_fidelity``: VLM shape existence, colours), tiny-wan on 8 (VLM existence on the first and
   last frames); ``$OUT/summary.json`` (plan, versions, per-model training info, parts, fidelity) and
   ``$OUT/samples.png`` (shipped and new samples).

``summary.json`` is rewritten after every step, so a call cut short still says what finished. ``--smoke`` runs
the same path on the CPU in seconds (tiny batches and pools, 1-prompt fidelity): what the test suite runs.

Back on the CPU: ``python -m mmeff.zoo.train_gpu --unpack <folder with the parts> --to .zoo_ckpt/gpu`` (joins
the parts and re-exports each checkpoint's EMA pipeline to ``<model>/model``) then
``python -m mmeff.zoo.train_sd3 --ckpt-dir .zoo_ckpt/gpu/tiny-sd3/ckpt --minutes <total> --out <folder>`` (or
``--init-from .zoo_ckpt/gpu/tiny-sd3/model``); the same for ``train_wan``. The resumed checkpoint keeps its
stage, so a larger ``--minutes`` re-stretches that stage's cosine over the new budget.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .bundle import pack, unpack
from .train_common import resolve_device

MODELS = Path(__file__).resolve().parent / "models"
FORMAT = "mmeff.zoo.train_gpu/1"

# What each model gets on the GPU (full) and in the CPU smoke run. "share" is the fraction of the training time
# left after the fixed reserves; sd3 goes first.
PLANS: dict[str, dict[str, Any]] = {
    "gpu": {
        "tiny-sd3": {"share": 0.4, "batch": 256, "lr": 1e-3, "pool": 65536, "amp": True},
        "tiny-wan": {"share": 0.6, "batch": 64, "lr": 5e-4, "pool": 16384, "amp": True, "vae_seconds": 60.0,
                     "vae_batch": 16, "vae_frames": 13, "vae_object_weight": 9.0, "new_per_step": 8, "data": "layout",
                     "vae_image_batch": 32, "image_batch": 256},
        "eval": {"sd3_n": 16, "wan_n": 8, "sd3_steps": 20, "wan_steps": 10, "reserve_s": 60.0, "vlm": True},
        "pack_reserve_s": 15.0, "load_overhead_s": 25.0, "max_steps_added": None,
    },
    "smoke": {
        "tiny-sd3": {"share": 0.5, "batch": 2, "lr": 1e-3, "pool": 4, "amp": False},
        "tiny-wan": {"share": 0.5, "batch": 2, "lr": 5e-4, "pool": 3, "amp": False, "vae_seconds": 0.5,
                     "vae_batch": 1, "vae_frames": 5, "vae_object_weight": 9.0, "new_per_step": 1, "data": "layout",
                     "vae_image_batch": 1, "image_batch": 2},
        "eval": {"sd3_n": 1, "wan_n": 1, "sd3_steps": 2, "wan_steps": 2, "reserve_s": 8.0, "vlm": True},
        "pack_reserve_s": 3.0, "load_overhead_s": 3.0, "max_steps_added": 3,
    },
}
# pack_reserve_s: seconds kept after each model's training for its export and packing; load_overhead_s: seconds a
# trainer spends outside its timed steps (building, loading, filling the pool), so not in its step budget;
# max_steps_added: diffusion steps after which a model stops whatever time is left (the smoke run's steps do not
# depend on how loaded the machine is).


def spent_minutes(folder: Path) -> tuple[float, float, int]:
    """``(vae minutes, vae + diffusion minutes, diffusion steps)`` a saved zoo model's ``training.json`` records."""
    meta = json.loads((folder / "training.json").read_text())
    vae, diff = meta["vae"], meta["diffusion"]
    return float(vae["minutes"]), float(vae["minutes"]) + float(diff["minutes"]), int(diff["steps"])


def versions(dev: torch.device) -> dict[str, Any]:
    import diffusers
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "device": str(dev), "cpu_count": os.cpu_count()}
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
        out["cuda"] = torch.version.cuda
    return out


class Run:
    """The call's clock, plan and ``summary.json`` (rewritten after every step)."""

    def __init__(self, out: Path, seconds: float, mode: str, dev: torch.device, work: Path) -> None:
        self.t0 = time.time()
        self.end = self.t0 + seconds
        self.out, self.work, self.mode, self.dev = out, work, mode, dev
        self.plan = PLANS[mode]
        self.summary: dict[str, Any] = {"format": FORMAT, "mode": mode, "seconds_limit": seconds, "plan": self.plan,
                                        "versions": versions(dev), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                            time.gmtime()),
                                        "models": {}, "fidelity": {}}
        self.write()

    def left(self) -> float:
        return self.end - time.time()

    def write(self) -> None:
        self.summary["elapsed_s"] = round(time.time() - self.t0, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1, default=str) + "\n")


def train_one(run: Run, name: str, train_seconds: float, workers: int) -> None:
    """Continue the shipped ``name`` for about ``train_seconds``, then export and pack it into ``run.out``."""
    p = run.plan[name]
    ckpt_dir, model_dir = run.work / name / "ckpt", run.work / name / "model"
    shipped = MODELS / name
    vae_min, spent, steps = spent_minutes(shipped)
    added = run.plan["max_steps_added"]
    deadline = time.time() + train_seconds
    t0 = time.time()
    budget_s = max(1.0, train_seconds - run.plan["load_overhead_s"])
    rec: dict[str, Any] = {"status": "running", "train_seconds_planned": round(train_seconds, 1),
                           "budget_seconds": round(budget_s, 1), "minutes_before": round(spent, 2)}
    run.summary["models"][name] = rec
    run.write()
    common = {"out_dir": model_dir, "ckpt_dir": ckpt_dir, "init_from": shipped, "ckpt_every": 60.0,
              "log_every": 100 if run.mode == "gpu" else 1, "threads": min(8, os.cpu_count() or 1) if run.mode == "gpu" else 1,
              "device": str(run.dev), "amp": p["amp"], "deadline": deadline, "render_workers": workers,
              "max_steps": None if added is None else steps + added}
    try:
        if name == "tiny-sd3":
            from .train_sd3 import train

            info = train(spent + budget_s / 60, batch=p["batch"], lr=p["lr"], pool_size=p["pool"], **common)
        else:
            from .train_wan import train as train_wan

            vae_minutes = vae_min + p["vae_seconds"] / 60
            info = train_wan(spent + budget_s / 60, vae_minutes=vae_minutes, batch=p["batch"], lr=p["lr"],
                             pool_size=p["pool"], vae_batch=p["vae_batch"], vae_frames=p["vae_frames"],
                             vae_object_weight=p["vae_object_weight"], new_per_step=p["new_per_step"],
                             data=p.get("data"), vae_image_batch=p.get("vae_image_batch", 0),
                             image_batch=p.get("image_batch", 0), **common)
        rec.update(status="trained", train_wall_s=round(time.time() - t0, 1),
                   diffusion_steps=info["diffusion"]["steps"], final_loss=info["diffusion"]["final_loss"],
                   last_run=info["runs"][-1] if info.get("runs") else None, model_dir=str(model_dir))
    except Exception as e:  # noqa: BLE001 - one model's failure must not cost the other its GPU time
        rec.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
        print(f"{name} failed: {e}", flush=True)
    if (ckpt_dir / "ckpt.pt").is_file():
        rec["parts"] = pack(name, ckpt_dir, model_dir, run.out)
        rec["total_wall_s"] = round(time.time() - t0, 1)
    run.write()


def quick_fidelity(run: Run) -> list[tuple[str, list[np.ndarray]]]:
    """Shipped vs new on the same held-out prompts; returns labelled image rows for ``samples.png``."""
    from .load import load
    from .load_pipeline import open_pipeline
    from .prompt_family import folder_family, held_out_scenes, scene_of_seed

    e = run.plan["eval"]
    rows: list[tuple[str, list[np.ndarray]]] = []
    vlm = load("tiny-qwen2-vl") if e["vlm"] else None
    new_sd3 = run.work / "tiny-sd3" / "model"
    if run.summary["models"].get("tiny-sd3", {}).get("status") == "trained" and run.left() > 0.2 * e["reserve_s"]:
        from ..eval.t2i_fidelity import evaluate

        family = folder_family(new_sd3)  # both sides are prompted the way the new model was trained
        scenes = held_out_scenes(family, "test", e["sd3_n"])
        res: dict[str, Any] = {"n": e["sd3_n"], "steps": e["sd3_steps"], "cfg": 4.0, "split": "test",
                               "prompt_family": family}
        for label, folder in (("shipped", MODELS / "tiny-sd3"), ("new", new_sd3)):
            pipe = open_pipeline(str(folder), device=str(run.dev))
            out = evaluate(pipe, vlm, scenes, steps=e["sd3_steps"], cfg=4.0, batch_size=16, family=family)
            res[label] = out["generated"]["summary"]
            res["renders"] = out["renders"]["summary"]
            rows.append((f"sd3 {label}", out["images"][:8]))
            if label == "new":
                rows.append(("sd3 render", out["render_images"][:8]))
        run.summary["fidelity"]["tiny-sd3"] = res
        run.write()
    new_wan = run.work / "tiny-wan" / "model"
    if run.summary["models"].get("tiny-wan", {}).get("status") == "trained" and run.left() > 0.2 * e["reserve_s"]:
        from ..eval.video_fidelity import frame_presence, generate, prompts_and_seeds
        from .load_video import TINY_WAN_CALL, TINY_WAN_CFG

        wan_family = folder_family(new_wan)
        items = prompts_and_seeds(e["wan_n"], family=wan_family)
        res = {"n": e["wan_n"], "steps": e["wan_steps"], "cfg": TINY_WAN_CFG, "frames_asked": [0, -1], "split": "test",
               "prompt_family": wan_family}
        for label, folder in (("shipped", MODELS / "tiny-wan"), ("new", new_wan)):
            pipe = open_pipeline(str(folder), device=str(run.dev))
            correct, firsts, means = [], [], []
            for prompt, seed in items:
                if run.left() < 0:  # past the call's limit: score what there is
                    res["cut_short"] = True
                    break
                video, _ = generate(pipe, prompt, seed, steps=e["wan_steps"], cfg=TINY_WAN_CFG, call=dict(TINY_WAN_CALL))
                firsts.append(video[video.shape[0] // 2].permute(1, 2, 0).numpy())
                means.append(float(video.mean()))
                if vlm is not None:
                    scene = scene_of_seed(wan_family, seed)
                    correct += [c for r in frame_presence(vlm, video, scene) for c in r["correct"].values()]
            res[label] = {"vlm_existence_acc": float(np.mean(correct)) if correct else None,
                          "mean_pixel": float(np.mean(means))}
            rows.append((f"wan {label} (mid frame)", firsts[:8]))
        run.summary["fidelity"]["tiny-wan"] = res
        run.write()
    return rows


def export_from_checkpoint(name: str) -> Any:
    """``export(ckpt_dir, model_dir)`` for :func:`mmeff.zoo.bundle.unpack`: the trainer's export-only run, which
    writes the checkpoint's EMA pipeline (the GPU call packs no weights it can re-make)."""

    def export(ckpt_dir: Path, model_dir: Path) -> None:
        state = torch.load(ckpt_dir / "ckpt.pt", map_location="cpu", weights_only=False)["state"]
        minutes = (state["vae_seconds"] + state["diff_seconds"]) / 60
        if name == "tiny-sd3":
            from .train_sd3 import train
        else:
            from .train_wan import train
        train(minutes, ckpt_dir=ckpt_dir, out_dir=model_dir, export_only=True)

    return export


def save_samples(path: Path, rows: list[tuple[str, list[np.ndarray]]]) -> None:
    from ..eval.guidance_eval import save_grid

    if rows:
        save_grid(path, dict(rows), scale=2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu-train")),
                    help="where the parts, summary.json and samples.png go (default $OUT)")
    ap.add_argument("--seconds", type=float, default=450.0, help="wall-clock limit of the whole call")
    ap.add_argument("--smoke", action="store_true", help="the same path on the CPU in seconds (tiny everything)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--workers", type=int, default=None,
                    help="render processes for the latent pools (default: CPU cores - 1; 0 with --smoke)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default <out>/../mmeff-gpu-work)")
    ap.add_argument("--only", choices=["tiny-sd3", "tiny-wan"], default=None, help="train one model only")
    ap.add_argument("--no-eval", action="store_true", help="skip the quick fidelity")
    ap.add_argument("--unpack", type=Path, default=None,
                    help="instead of training: join and extract the parts found in this folder")
    ap.add_argument("--to", type=Path, default=Path(".zoo_ckpt/gpu"),
                    help="where --unpack extracts the checkpoints and re-exports the pipelines")
    a = ap.parse_args(argv)
    if a.unpack is not None:
        for name in ("tiny-sd3", "tiny-wan"):
            try:
                print(f"{name}: {unpack(name, a.unpack, a.to, export=export_from_checkpoint(name))}")
            except FileNotFoundError as e:
                print(f"{name}: {e}")
        return
    mode = "smoke" if a.smoke else "gpu"
    dev = resolve_device(a.device or ("cpu" if a.smoke else "cuda"))
    workers = a.workers if a.workers is not None else (0 if a.smoke else max(0, (os.cpu_count() or 1) - 1))
    work = a.work or a.out.resolve().parent / f"{a.out.resolve().name}-work"
    run = Run(a.out, a.seconds, mode, dev, work)
    run.summary["workers"] = workers
    names = [a.only] if a.only else ["tiny-sd3", "tiny-wan"]
    eval_reserve = 0.0 if a.no_eval else run.plan["eval"]["reserve_s"]
    for i, name in enumerate(names):
        rest = names[i:]
        avail = run.left() - eval_reserve - run.plan["pack_reserve_s"] * len(rest)
        share = run.plan[name]["share"] / sum(run.plan[n]["share"] for n in rest)
        seconds = avail * share
        if seconds < run.plan["load_overhead_s"] + 2:
            run.summary["models"][name] = {"status": "skipped", "why": f"{avail:.0f} s left"}
            run.write()
            continue
        print(f"=== {name}: {seconds:.0f} s of training ({run.left():.0f} s left in the call)", flush=True)
        train_one(run, name, seconds, workers)
    if not a.no_eval:
        try:
            save_samples(a.out / "samples.png", quick_fidelity(run))
        except Exception as e:  # noqa: BLE001 - the trained models are already packed; say why and finish
            run.summary["fidelity"]["error"] = f"{type(e).__name__}: {e}"
            run.summary["fidelity"]["traceback"] = traceback.format_exc()[-3000:]
    run.summary["finished"] = True
    run.write()
    print(json.dumps({k: run.summary[k] for k in ("elapsed_s", "fidelity")}, default=str)[:4000], flush=True)


if __name__ == "__main__":
    main()
