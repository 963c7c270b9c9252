"""Train ``tiny-clip-judge`` (see :mod:`mmeff.zoo.judge`): ``python -m mmeff.zoo.train_judge --minutes 12``.

Contrastive (symmetric InfoNCE, learnable temperature) on train-split world images rendered at 32 px against
their text (``make_caption`` with label words or ``make_prompt``, 50/50), plus a BCE loss (positive weight 4)
for the (colour, shape) presence head on the unnormalised image embedding. Images get light Gaussian noise
half of the time so generated (imperfect) images are scored sensibly. Time-bounded and resumable
(``.zoo_ckpt/tiny-clip-judge/ckpt.pt``); the result (``model.pt`` state dict + ``config.json`` +
``training.json`` with validation metrics) goes to ``mmeff/zoo/models/tiny-clip-judge/``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .judge import (
    IMAGE_SIZE,
    MODEL_DIR,
    Judge,
    build,
    default_config,
    requested_objects,
    to_tensor,
)

ROOT = Path(__file__).resolve().parents[2]
CKPT_DIR = ROOT / ".zoo_ckpt" / "tiny-clip-judge"


def batch_data(seeds: list[int], config: dict[str, Any], rng: random.Random,
               noise: bool = True) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    from .world import generate_scene, make_caption, make_prompt, render

    scenes = [generate_scene(s) for s in seeds]
    x = to_tensor([render(sc, size=IMAGE_SIZE) for sc in scenes], config)
    if noise:
        sig = torch.tensor([rng.random() * 0.3 if rng.random() < 0.5 else 0.0 for _ in seeds]).view(-1, 1, 1, 1)
        x = x + sig * torch.randn_like(x)
    texts = [make_caption(sc) if rng.random() < 0.5 else make_prompt(sc) for sc in scenes]
    pairs = config["presence_pairs"]
    y = torch.zeros(len(scenes), len(pairs))
    for i, sc in enumerate(scenes):
        for p in requested_objects(sc):
            y[i, pairs.index(p)] = 1.0
    return x, texts, y


@torch.no_grad()
def evaluate(judge: Judge, n: int = 256) -> dict[str, float]:
    """Validation-split metrics: in-batch retrieval, own-vs-mismatched caption, presence accuracy."""
    from .world import generate_scene, make_caption, make_prompt, render, split_seeds

    scenes = [generate_scene(s) for s in split_seeds("val", n)]
    images = [render(sc, size=IMAGE_SIZE) for sc in scenes]
    caps = [make_caption(sc) for sc in scenes]
    im, tx = judge.embed_images(images), judge.embed_texts(caps)
    sim = im @ tx.T
    i2t = float((sim.argmax(1) == torch.arange(n)).float().mean())
    own = sim.diag()
    mism = sim[torch.arange(n), (torch.arange(n) + 1) % n]
    presence = judge.object_presence(images, scenes)
    prompt_presence = judge.object_presence(images, [make_prompt(sc) for sc in scenes])
    probs = judge.presence_probs(images)
    y = torch.zeros_like(probs)
    for i, sc in enumerate(scenes):
        for p in requested_objects(sc):
            y[i, judge.pairs.index(p)] = 1
    pred = probs > 0.5
    return {"val_n": n, "i2t_top1": i2t, "own_gt_mismatched": float((own > mism).float().mean()),
            "mean_clip_score_own": float(100 * own.mean()), "mean_clip_score_mismatched": float(100 * mism.mean()),
            "presence_recall_scenes": float(np.mean(presence)), "presence_recall_prompts": float(np.mean(prompt_presence)),
            "presence_false_positive_rate": float((pred & (y == 0)).sum() / (y == 0).sum())}


def train(minutes: float, batch: int = 64, seed: int = 0, out_dir: Path = MODEL_DIR, ckpt_dir: Path = CKPT_DIR,
          fresh: bool = False, threads: int | None = 1, ckpt_every: float = 60.0, log_every: int = 25) -> dict:
    if threads:
        torch.set_num_threads(threads)
    model, config = build(default_config(), seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    st: dict[str, Any] = {"step": 0, "seconds": 0.0, "losses": []}
    ckpt = ckpt_dir / "ckpt.pt"
    if ckpt.exists() and not fresh:
        ck = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        st.update(ck["state"])
        print(f"resumed from {ckpt} at step {st['step']}")

    def save_ckpt() -> None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": st}, ckpt.with_suffix(".tmp"))
        os.replace(ckpt.with_suffix(".tmp"), ckpt)

    model.train()
    last = time.time()
    run: list[float] = []
    while st["seconds"] < minutes * 60:
        t0 = time.time()
        rng = random.Random(f"judge-{seed}-{st['step']}")
        start = (st["step"] * batch * 104_729 + 17) % 1_000_000
        x, texts, y = batch_data([(start + i) % 1_000_000 for i in range(batch)], config, rng)
        tok = Judge(model, config).tokenizer(texts)
        model.train()
        for g in opt.param_groups:
            g["lr"] = 1e-3 * min(1.0, (st["step"] + 1) / 100)
        feats = model.clip.encode_image(x)
        im = F.normalize(feats, dim=-1)
        tx = model.clip.encode_text(tok, normalize=True)
        logits = model.clip.logit_scale.exp().clamp(max=100) * im @ tx.T
        lab = torch.arange(batch)
        # captions can repeat inside a batch (e.g. single-object scenes): mask exact duplicates off the diagonal
        same = torch.tensor([[a == b for b in texts] for a in texts]) & ~torch.eye(batch, dtype=torch.bool)
        logits = logits.masked_fill(same, -1e4)
        con = (F.cross_entropy(logits, lab) + F.cross_entropy(logits.T, lab)) / 2
        pres = F.binary_cross_entropy_with_logits(model.presence(feats), y, pos_weight=torch.full((y.shape[1],), 4.0))
        loss = con + pres
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run.append(loss.item())
        st["step"] += 1
        st["seconds"] += time.time() - t0
        if st["step"] % log_every == 0:
            st["losses"].append([st["step"], float(np.mean(run))])
            print(f"judge step {st['step']} loss {np.mean(run):.4f} ({st['seconds'] / 60:.1f} min)", flush=True)
            run = []
        if time.time() - last > ckpt_every:
            save_ckpt()
            last = time.time()
    save_ckpt()
    model.eval()
    judge = Judge(model, config)
    metrics = evaluate(judge)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / "model.pt")
    (out_dir / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    import open_clip

    info = {"format": config["format"], "trained": st["step"] > 0, "seed": seed, "batch_size": batch,
            "steps": st["step"], "samples_seen": st["step"] * batch, "minutes": round(st["seconds"] / 60, 2),
            "loss_curve": st["losses"], "final_loss": st["losses"][-1][1] if st["losses"] else None,
            "params": sum(p.numel() for p in model.parameters()), "val": metrics,
            "disk_bytes": (out_dir / "model.pt").stat().st_size,
            "method": "open_clip CLIP (custom tiny config, word tokenizer) + linear colour-shape presence head; "
                      "InfoNCE + BCE on train-split world images (32 px) vs make_caption/make_prompt",
            "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__}}
    (out_dir / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(metrics))
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=12.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--out", type=Path, default=MODEL_DIR)
    ap.add_argument("--ckpt-dir", type=Path, default=CKPT_DIR)
    a = ap.parse_args(argv)
    train(a.minutes, a.batch, a.seed, a.out, a.ckpt_dir, a.fresh, a.threads)


if __name__ == "__main__":
    main()
