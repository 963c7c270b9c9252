"""Sharpen a saved zoo diffusion pipeline's VAE *decoder* (tiny-sd3 or tiny-wan), leaving its encoder, and so its
latent space, untouched.

``python -m mmeff.zoo.decoder_ft --pipe <saved tiny-sd3 or tiny-wan> --minutes 20 --out <folder>``

Why: the VAEs' reconstructions lose shapes and colours. On 48 held-out layout renders the zoo VLM's shape
existence falls from 0.99 (renders) to 0.875 through tiny-sd3's 64px VAE, and tiny-wan's VAE turns a green
square into a blue disc in the first frame of a video (the causal first frame is 1 of 13 in its loss). That
caps any transformer trained on their latents. The encoder fixes the latents a transformer is trained on, so
only the decoder is trained here: a transformer trained (or training) on the old decoder's latents stays valid,
and the new decoder drops into its pipeline.

The loss is the zoo's reconstruction loss (MSE + 0.5 L1, object pixels weighted 10x) on renders of the
pipeline's prompt family (:mod:`mmeff.zoo.prompt_family`): full 64 px images for tiny-sd3; 32 px crops of
13-frame videos for tiny-wan, with the first frame's loss weighted ``--first-frame-weight`` times. The decoder
sees the encoder's posterior mean plus Gaussian noise of a random scale up to ``--latent-noise`` (in the
diffusion's normalised latent units): a transformer's samples are not exact latents, and the noise teaches the
decoder to draw crisp outlines from near-miss latents.

Resumable: a checkpoint (decoder, optimiser, counters) is written every ``--ckpt-every`` seconds to
``--ckpt-dir``; rerunning continues until ``--minutes`` are spent, so a rerun with the budget spent only writes
the pipeline (the way to drop the decoder into a newer export of the same model). The output is the whole
pipeline with the new decoder and a ``decoder_finetune`` record in ``training.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .train_common import object_mask, save_ckpt


def decoder_params(vae: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the fine-tune trains: the decoder and the post-quant conv (if any); never the encoder."""
    mods = [vae.decoder] + ([vae.post_quant_conv] if getattr(vae, "post_quant_conv", None) is not None else [])
    return [p for m in mods for p in m.parameters()]


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, object_weight: float, l1: float,
                        extra: torch.Tensor | None = None) -> torch.Tensor:
    """The zoo's VAE loss: object-weighted MSE + ``l1`` x object-weighted L1 (``extra``: further per-pixel
    weights, broadcast). Images ``[B, C, H, W]`` or videos ``[B, C, T, H, W]``."""
    if x.dim() == 5:
        b, c, t, h, w = x.shape
        mask = object_mask(x.transpose(1, 2).reshape(b * t, c, h, w)).view(b, t, 1, h, w).transpose(1, 2)
    else:
        mask = object_mask(x)
    weight = 1.0 + object_weight * mask
    if extra is not None:
        weight = weight * extra
    err = rec - x
    return (weight * err ** 2).mean() + l1 * (weight * err.abs()).mean()


@dataclass
class Adapter:
    """How one pipeline kind draws training data, encodes to normalised latents and decodes them."""

    kind: str
    batch: Callable[[int, int], torch.Tensor]  # (step, batch size) -> pixels in [-1, 1]
    encode: Callable[[torch.Tensor], torch.Tensor]  # pixels -> normalised latents (no grad)
    decode: Callable[[torch.Tensor], torch.Tensor]  # normalised latents -> pixels (with grad)
    frame_weights: Callable[[torch.Tensor], torch.Tensor | None]


def sd3_adapter(pipe: Any, data: str) -> Adapter:
    from .train_sd3 import train_seeds, world_batch

    vae = pipe.vae
    size = int(vae.config.sample_size)
    shift, scale = float(vae.config.shift_factor), float(vae.config.scaling_factor)
    return Adapter(
        "sd3",
        batch=lambda step, n: world_batch(train_seeds(step, n, 2), size, data)[0],
        encode=lambda x: (vae.encode(x).latent_dist.mode() - shift) * scale,
        decode=lambda z: vae.decode(z / scale + shift).sample,
        frame_weights=lambda x: None)


def wan_adapter(pipe: Any, data: str, crop: int, first_frame_weight: float) -> Adapter:
    from .train_common import random_crops
    from .train_wan import FRAMES, decode_unclamped, train_seeds, world_videos

    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)

    def batch(step: int, n: int) -> torch.Tensor:
        x = world_videos(train_seeds(step, n, 2), frames=FRAMES, data=data)[0]
        return random_crops(x, crop, step) if crop else x

    def frame_weights(x: torch.Tensor) -> torch.Tensor:
        w = torch.ones(1, 1, x.shape[2], 1, 1)
        w[:, :, 0] = first_frame_weight
        return w * x.shape[2] / w.sum()  # the mean weight stays 1

    return Adapter(
        "wan", batch=batch,
        encode=lambda x: (vae.encode(x).latent_dist.mean - mean) / std,
        decode=lambda z: decode_unclamped(vae, z * std + mean),
        frame_weights=frame_weights)


def load_any(pipe_dir: Path) -> tuple[Any, str]:
    """The saved pipeline and its kind (``"sd3"`` or ``"wan"``), from ``model_index.json``."""
    from diffusers import StableDiffusion3Pipeline, WanPipeline

    cls = json.loads((pipe_dir / "model_index.json").read_text())["_class_name"]
    if cls == "WanPipeline":
        return WanPipeline.from_pretrained(pipe_dir), "wan"
    return StableDiffusion3Pipeline.from_pretrained(pipe_dir), "sd3"


def finetune(pipe_dir: Path, out: Path, minutes: float, *, ckpt_dir: Path, data: str | None = None,
             batch: int = 16, lr: float = 5e-4, latent_noise: float = 0.2, object_weight: float = 9.0,
             l1: float = 0.5, ckpt_every: float = 120.0, log_every: int = 25, seed: int = 0, crop: int = 32,
             first_frame_weight: float = 4.0) -> dict[str, Any]:
    """Train ``pipe_dir``'s VAE decoder for ``minutes`` (in total, over resumed runs) and save the pipeline
    with it to ``out``. ``data`` defaults to the pipeline's prompt family. ``crop`` and ``first_frame_weight``
    apply to video pipelines."""
    from ..core.errors import ConfigError
    from .prompt_family import folder_family

    if not ((pipe_dir / "model_index.json").is_file() and (pipe_dir / "training.json").is_file()):
        raise ConfigError(f"decoder_ft: {pipe_dir} is not a saved zoo pipeline (it needs model_index.json and "
                          "training.json); pass a folder written by train_sd3 / train_wan or a shipped zoo model")
    meta = json.loads((pipe_dir / "training.json").read_text())
    data = data or folder_family(pipe_dir)
    pipe, kind = load_any(pipe_dir)
    vae = pipe.vae
    vae.requires_grad_(False)
    params = decoder_params(vae)
    for p in params:
        p.requires_grad_(True)
    ad = sd3_adapter(pipe, data) if kind == "sd3" else wan_adapter(pipe, data, crop, first_frame_weight)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    st: dict[str, Any] = {"step": 0, "seconds": 0.0, "losses": []}
    ck_path = ckpt_dir / "decoder_ft.pt"
    if ck_path.exists():
        ck = torch.load(ck_path, map_location="cpu", weights_only=False)
        vae.decoder.load_state_dict(ck["decoder"])
        if ck.get("post_quant_conv") is not None:
            vae.post_quant_conv.load_state_dict(ck["post_quant_conv"])
        opt.load_state_dict(ck["opt"])
        st = ck["state"]
        print(f"resumed decoder fine-tune at step {st['step']} ({st['seconds'] / 60:.1f} min)", flush=True)
    gen = torch.Generator().manual_seed(seed * 7919 + st["step"])
    run: list[float] = []
    last_ck = time.time()
    pqc = getattr(vae, "post_quant_conv", None)

    def checkpoint() -> None:
        save_ckpt(ck_path, {"decoder": vae.decoder.state_dict(), "opt": opt.state_dict(), "state": st,
                            "post_quant_conv": None if pqc is None else pqc.state_dict()})

    vae.decoder.train()
    while st["seconds"] < minutes * 60:
        t0 = time.time()
        x = ad.batch(st["step"], batch)
        with torch.no_grad():
            z = ad.encode(x)
            noise = torch.rand((z.shape[0],) + (1,) * (z.dim() - 1), generator=gen) * latent_noise
            z = z + noise * torch.randn(z.shape, generator=gen)
        rec = ad.decode(z)
        frac = st["seconds"] / max(minutes * 60, 1e-9)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (st["step"] + 1) / 50) * (0.1 + 0.45 * (1 + np.cos(np.pi * min(1.0, frac))))
        loss = reconstruction_loss(rec, x, object_weight, l1, ad.frame_weights(x))
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
                                "data": data, "loss_curve": st["losses"], "encoder": "frozen (latent space kept)",
                                **({"crop": crop, "first_frame_weight": first_frame_weight} if kind == "wan" else {})}
    (out / "training.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"saved {out}: decoder fine-tuned {st['step']} steps", flush=True)
    return meta["decoder_finetune"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipe", type=Path, required=True, help="a saved tiny-sd3 or tiny-wan folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=20.0, help="total fine-tune budget (resumed runs count)")
    ap.add_argument("--ckpt-dir", type=Path, default=Path(".zoo_ckpt/decoder-ft"))
    ap.add_argument("--data", choices=["world", "layout"], default=None, help="default: the pipeline's prompt family")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--latent-noise", type=float, default=0.2)
    ap.add_argument("--crop", type=int, default=32, help="video pipelines: square crop size (0: full frames)")
    ap.add_argument("--first-frame-weight", type=float, default=4.0, help="video pipelines: frame 0's loss weight")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ckpt-every", type=float, default=120.0)
    ap.add_argument("--log-every", type=int, default=25)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    finetune(a.pipe, a.out, a.minutes, ckpt_dir=a.ckpt_dir, data=a.data, batch=a.batch, lr=a.lr,
             latent_noise=a.latent_noise, ckpt_every=a.ckpt_every, log_every=a.log_every, crop=a.crop,
             first_frame_weight=a.first_frame_weight)


if __name__ == "__main__":
    main()
