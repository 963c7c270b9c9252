"""Sharpen a saved tiny-sd3's VAE *decoder*, leaving its encoder (and so its latent space) untouched.

``python -m mmeff.zoo.sd3_decoder_ft --pipe <saved tiny-sd3> --minutes 20 --out <folder>``

Why: the 64px VAE's reconstructions lose shapes. On 32 held-out layout renders the zoo VLM's shape existence
falls from 0.99 (renders) to 0.91 (encode, decode), and that caps any transformer trained on its latents. The
encoder fixes the latents the transformer is trained on, so only the decoder is trained here. A transformer
trained (or training) on the old decoder's latents stays valid, and the new decoder drops into its pipeline.

The loss is the 64px recipe's reconstruction loss (MSE + 0.5 L1, object pixels weighted 10x), on full 64 px
renders of the recipe's data. The decoder sees the encoder's posterior mean plus Gaussian noise of a random
scale up to ``--latent-noise`` (in the diffusion's normalised latent units). A transformer's samples are not
exact latents, and the noise teaches the decoder to draw crisp outlines from near-miss latents.

Resumable: a checkpoint (decoder, optimiser, counters) is written every ``--ckpt-every`` seconds to
``--ckpt-dir``; rerunning continues until ``--minutes`` are spent. The output is the whole pipeline with the
new decoder and a ``decoder_finetune`` record in ``training.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .train_common import object_mask, save_ckpt


def decoder_params(vae: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the fine-tune trains: the decoder and the post-quant conv (if any); never the encoder."""
    mods = [vae.decoder] + ([vae.post_quant_conv] if getattr(vae, "post_quant_conv", None) is not None else [])
    return [p for m in mods for p in m.parameters()]


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, object_weight: float, l1: float) -> torch.Tensor:
    """The 64px recipe's VAE loss: object-weighted MSE + ``l1`` x object-weighted L1."""
    w = 1.0 + object_weight * object_mask(x)
    err = rec - x
    return (w * err ** 2).mean() + l1 * (w * err.abs()).mean()


def finetune(pipe_dir: Path, out: Path, minutes: float, *, ckpt_dir: Path, data: str | None = None,
             batch: int = 16, lr: float = 5e-4, latent_noise: float = 0.2, object_weight: float = 9.0,
             l1: float = 0.5, ckpt_every: float = 120.0, log_every: int = 25, seed: int = 0) -> dict[str, Any]:
    """Train ``pipe_dir``'s VAE decoder for ``minutes`` (in total, over resumed runs) and save the pipeline
    with it to ``out``. ``data`` defaults to the pipeline's recipe's (``"layout"`` or ``"world"``)."""
    from diffusers import StableDiffusion3Pipeline

    from .train_sd3 import recipe_of, train_seeds, world_batch

    meta = json.loads((pipe_dir / "training.json").read_text())
    data = data or recipe_of(meta.get("recipe", "64px")).get("data", "world")
    pipe = StableDiffusion3Pipeline.from_pretrained(pipe_dir)
    vae = pipe.vae
    vae.requires_grad_(False)
    params = decoder_params(vae)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    st: dict[str, Any] = {"step": 0, "seconds": 0.0, "losses": []}
    ck_path = ckpt_dir / "decoder_ft.pt"
    if ck_path.exists():
        ck = torch.load(ck_path, map_location="cpu", weights_only=False)
        vae.decoder.load_state_dict(ck["decoder"])
        opt.load_state_dict(ck["opt"])
        st = ck["state"]
        print(f"resumed decoder fine-tune at step {st['step']} ({st['seconds'] / 60:.1f} min)", flush=True)
    size = int(vae.config.sample_size)
    shift, scale = float(vae.config.shift_factor), float(vae.config.scaling_factor)
    gen = torch.Generator().manual_seed(seed * 7919 + st["step"])
    run: list[float] = []
    last_ck = time.time()

    def checkpoint() -> None:
        save_ckpt(ck_path, {"decoder": vae.decoder.state_dict(), "opt": opt.state_dict(), "state": st})

    vae.decoder.train()
    while st["seconds"] < minutes * 60:
        t0 = time.time()
        x, _ = world_batch(train_seeds(st["step"], batch, 2), size, data)
        with torch.no_grad():
            z = (vae.encode(x).latent_dist.mode() - shift) * scale
            z = z + torch.rand(batch, 1, 1, 1, generator=gen) * latent_noise * torch.randn(z.shape, generator=gen)
        rec = vae.decode(z / scale + shift).sample
        frac = st["seconds"] / max(minutes * 60, 1e-9)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (st["step"] + 1) / 50) * (0.1 + 0.45 * (1 + np.cos(np.pi * min(1.0, frac))))
        loss = reconstruction_loss(rec, x, object_weight, l1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run.append(float(loss.detach()))
        st["step"] += 1
        st["seconds"] += time.time() - t0
        if st["step"] % log_every == 0:
            st["losses"].append([st["step"], float(np.mean(run))])
            print(f"decoder step {st['step']} loss {np.mean(run):.4f} ({st['seconds'] / 60:.1f} min)", flush=True)
            run = []
        if time.time() - last_ck > ckpt_every:
            checkpoint()
            last_ck = time.time()
    checkpoint()
    vae.eval()
    if out.resolve() != pipe_dir.resolve():
        shutil.rmtree(out, ignore_errors=True)
    pipe.save_pretrained(out)
    meta["decoder_finetune"] = {"steps": st["step"], "minutes": round(st["seconds"] / 60, 2), "batch": batch,
                                "lr": lr, "latent_noise": latent_noise, "object_weight": object_weight, "l1": l1,
                                "data": data, "loss_curve": st["losses"], "encoder": "frozen (latent space kept)"}
    (out / "training.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"saved {out}: decoder fine-tuned {st['step']} steps", flush=True)
    return meta["decoder_finetune"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipe", type=Path, required=True, help="a saved tiny-sd3 folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=20.0, help="total fine-tune budget (resumed runs count)")
    ap.add_argument("--ckpt-dir", type=Path, default=Path(".zoo_ckpt/tiny-sd3-decoder"))
    ap.add_argument("--data", choices=["world", "layout"], default=None, help="default: the pipeline recipe's")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--latent-noise", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ckpt-every", type=float, default=120.0)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    finetune(a.pipe, a.out, a.minutes, ckpt_dir=a.ckpt_dir, data=a.data, batch=a.batch, lr=a.lr,
             latent_noise=a.latent_noise, ckpt_every=a.ckpt_every)


if __name__ == "__main__":
    main()
