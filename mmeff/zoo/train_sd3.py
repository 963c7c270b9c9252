"""Train ``tiny-sd3``: a real :class:`diffusers.StableDiffusion3Pipeline`, tiny, on 32x32 shapes-world images.

``python -m mmeff.zoo.train_sd3 --minutes 20`` builds every component from a config (nothing is downloaded):

- **tokenizers**: word-level, in memory. Both CLIP tokenizers are BPE models whose merges are learned (with the
  ``tokenizers`` BPE trainer) on the world vocabulary only, so every world word (colours, shapes, sizes,
  backgrounds, label words, "a", "on", "and" ...) is one token and anything else falls back to characters. The
  T5 tokenizer is a Unigram model with one ``"\u2581word"`` piece per world word plus character fallbacks.
- **text encoders**: two ``CLIPTextModelWithProjection`` (2 layers, width 32, projection 32; 36 positions) and a
  ``T5EncoderModel`` (2 layers, d_model 64). They are trained jointly with the transformer.
- **VAE**: its own ``AutoencoderKL`` (channels 16/32, one 2x downsample, 4 latent channels), trained first as an
  autoencoder (MSE + a small KL term) on world images; ``scaling_factor``/``shift_factor`` are then set from the
  latent statistics so the diffusion latents are ~unit variance. 32x32 px images give 4x16x16 latents.
- **transformer**: ``SD3Transformer2DModel`` (4 joint blocks, 4 heads x 16, patch 2 -> 64 image tokens, 64 text
  tokens), trained with rectified flow exactly as ``FlowMatchEulerDiscreteScheduler`` samples it:
  ``x_t = (1 - t) x0 + t eps``, target ``eps - x0``, timestep input ``1000 t``, t ~ logit-normal(0, 1).
  The prompt (``make_prompt`` of a train-split scene) is dropped to ``""`` 10% of the time, which is what the
  pipeline's CFG uses as the default negative prompt.

Training is time-bounded and resumable: a checkpoint is written to ``.zoo_ckpt/tiny-sd3/ckpt.pt`` every
``--ckpt-every`` seconds; rerunning continues until the total budget ``--minutes`` is spent (``--fresh``
starts over). The final pipeline goes to ``mmeff/zoo/models/tiny-sd3/`` via ``save_pretrained``, with
``training.json`` (seed, steps, samples seen, minutes, losses, sizes). Load it with
:func:`mmeff.zoo.load_pipeline.load_pipeline` (``"tiny-sd3"``).
"""
from __future__ import annotations

import argparse
import json
import os
import string
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .saved_meta import read_training_json

ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = Path(__file__).resolve().parent / "models"
OUT_DIR = MODELS_DIR / "tiny-sd3"
CKPT_DIR = ROOT / ".zoo_ckpt" / "tiny-sd3"
IMAGE_SIZE = 32
TEXT_LEN = 36  # CLIP positions and T5 max_sequence_length
FORMAT = "mmeff.zoo.tiny-sd3/1"


# ---------------------------------------------------------------------------------------------- vocabulary
def world_vocabulary() -> list[str]:
    """Every word a world prompt or caption can contain (lower case, no punctuation)."""
    from .world import BACKGROUNDS, COLOURS, SHAPES, SIZES, WORDS

    words = ["a", "an", "on", "and", "background", "labelled"]
    words += list(SIZES) + list(COLOURS) + list(SHAPES) + list(BACKGROUNDS) + [w.lower() for w in WORDS]
    return list(dict.fromkeys(words))


_CHARS = list(string.ascii_lowercase + string.digits) + [",", '"', "."]


def clip_tokenizer(max_length: int = TEXT_LEN) -> Any:
    """A CLIP BPE tokenizer whose merges make every world word a single token (built in memory)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    tk = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=4000, min_frequency=1, show_progress=False,
                                  special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  initial_alphabet=_CHARS, end_of_word_suffix="</w>")
    tk.train_from_iterator([" ".join(world_vocabulary())] * 2, trainer)
    model = json.loads(tk.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def t5_tokenizer() -> Any:
    """A T5 (Unigram) tokenizer with one piece per world word and character fallbacks (built in memory)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -6.0) for c in _CHARS] + [("\u2581" + c, -6.0) for c in _CHARS]
    seen = {p for p, _ in vocab}
    vocab += [("\u2581" + w, -1.0) for w in world_vocabulary() if "\u2581" + w not in seen]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


# ---------------------------------------------------------------------------------------------- components
def build_vae(seed: int = 0) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                         layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=IMAGE_SIZE,
                         mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
                         scaling_factor=1.0, shift_factor=0.0)


def build_pipeline(seed: int = 0) -> Any:
    """A freshly initialised tiny SD3 pipeline (VAE untrained as well)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    tok, tok3 = clip_tokenizer(), t5_tokenizer()
    encoders = []
    for i in range(2):
        torch.manual_seed(seed + 1 + i)
        cfg = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             vocab_size=len(tok), projection_dim=32, bos_token_id=0, eos_token_id=1,
                             pad_token_id=1, max_position_embeddings=TEXT_LEN)
        encoders.append(CLIPTextModelWithProjection(cfg))
    torch.manual_seed(seed + 3)
    t5 = T5EncoderModel(T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=len(tok3),
                                 relative_attention_num_buckets=16, dropout_rate=0.0))
    torch.manual_seed(seed + 4)
    transformer = SD3Transformer2DModel(sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=4, num_layers=4,
                                        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=64, pooled_projection_dim=64, out_channels=4,
                                        pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=build_vae(seed), text_encoder=encoders[0], tokenizer=tok,
                                    text_encoder_2=encoders[1], tokenizer_2=clip_tokenizer(),
                                    text_encoder_3=t5, tokenizer_3=tok3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------- data
def world_batch(seeds: list[int], size: int = IMAGE_SIZE) -> tuple[torch.Tensor, list[str]]:
    """Images in [-1, 1] ([B, 3, size, size]) and ``make_prompt`` prompts of the scenes ``seeds``."""
    from .world import generate_scene, make_prompt, render

    scenes = [generate_scene(s) for s in seeds]
    arr = np.stack([np.asarray(render(sc, size=size), dtype=np.float32) for sc in scenes])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0
    return x, [make_prompt(sc) for sc in scenes]


def train_seeds(step: int, batch: int, phase: int) -> list[int]:
    """Train-split scene seeds of one batch (phase 0: VAE, 1: diffusion; different orders)."""
    n = 1_000_000
    start = (step * batch * 7919 + phase * 499_979) % n
    return [(start + i) % n for i in range(batch)]


# ---------------------------------------------------------------------------------------------- helpers
def encode_text(pipe: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's own prompt encoding (with gradients): ``(prompt_embeds, pooled_prompt_embeds)``."""
    pe, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                          do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN,
                                          device=torch.device("cpu"))
    return pe, pooled


def text_modules(pipe: Any) -> list[torch.nn.Module]:
    return [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _save_ckpt(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_saved(pipe: Any, folder: Path) -> dict[str, Any]:
    """Copy the weights of a saved tiny-sd3 pipeline into ``pipe`` (built by :func:`build_pipeline`)
    and return the training state its ``training.json`` records (counters, curves, latent
    statistics), so a continued run's schedule, data order and report carry on from it."""
    from diffusers import StableDiffusion3Pipeline

    meta = read_training_json(folder, FORMAT, "train_sd3")
    saved = StableDiffusion3Pipeline.from_pretrained(folder)
    for name in ("vae", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        getattr(pipe, name).load_state_dict(getattr(saved, name).state_dict())
    vae, diff = meta["vae"], meta["diffusion"]
    return {"phase": 1, "vae_step": vae["steps"], "vae_seconds": vae["minutes"] * 60, "vae_losses": vae["mse_curve"],
            "step": diff["steps"], "diff_seconds": diff["minutes"] * 60, "losses": diff["loss_curve"],
            "latent_shift": vae["shift_factor"], "latent_scale": vae["scaling_factor"]}


def _lr(step: int, base: float, warmup: int) -> float:
    return base * min(1.0, (step + 1) / warmup)


# ---------------------------------------------------------------------------------------------- training
def train(minutes: float, vae_minutes: float | None = None, batch: int = 16, seed: int = 0,
          ckpt_every: float = 60.0, fresh: bool = False, out_dir: Path = OUT_DIR, ckpt_dir: Path = CKPT_DIR,
          threads: int | None = None, log_every: int = 50, init_from: Path | None = None) -> dict[str, Any]:
    """Train (or resume) tiny-sd3 until ``minutes`` in total are spent; ``init_from`` (a saved
    tiny-sd3 folder, e.g. the shipped one) continues that model instead of starting fresh, so
    training can go on across machines that keep no ``.zoo_ckpt``."""
    if threads:
        torch.set_num_threads(threads)
    vae_minutes = min(4.0, 0.2 * minutes) if vae_minutes is None else vae_minutes
    ckpt_path = ckpt_dir / "ckpt.pt"
    torch.manual_seed(seed)
    pipe = build_pipeline(seed)
    vae, tr = pipe.vae, pipe.transformer
    diff_params = [p for m in [tr, *text_modules(pipe)] for p in m.parameters()]
    opt_vae = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    opt = torch.optim.AdamW(diff_params, lr=3e-4, weight_decay=0.01)
    st: dict[str, Any] = {"phase": 0, "vae_step": 0, "step": 0, "vae_seconds": 0.0, "diff_seconds": 0.0,
                          "vae_losses": [], "losses": [], "latent_shift": 0.0, "latent_scale": 1.0}
    if ckpt_path.exists() and not fresh:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        for name, mod in [("vae", vae), ("transformer", tr), ("te1", pipe.text_encoder),
                          ("te2", pipe.text_encoder_2), ("te3", pipe.text_encoder_3)]:
            mod.load_state_dict(ck[name])
        opt_vae.load_state_dict(ck["opt_vae"])
        opt.load_state_dict(ck["opt"])
        st.update(ck["state"])
        torch.set_rng_state(ck["rng"])
        print(f"resumed from {ckpt_path}: phase {st['phase']}, vae_step {st['vae_step']}, step {st['step']}")
    elif init_from is not None:
        st.update(load_saved(pipe, Path(init_from)))
        print(f"continuing {init_from}: diffusion step {st['step']}, "
              f"{(st['vae_seconds'] + st['diff_seconds']) / 60:.1f} of {minutes:.0f} min spent")

    def checkpoint() -> None:
        _save_ckpt(ckpt_path, {"vae": vae.state_dict(), "transformer": tr.state_dict(),
                               "te1": pipe.text_encoder.state_dict(), "te2": pipe.text_encoder_2.state_dict(),
                               "te3": pipe.text_encoder_3.state_dict(), "opt_vae": opt_vae.state_dict(),
                               "opt": opt.state_dict(), "state": st, "rng": torch.get_rng_state()})

    # ---- phase 0: the VAE as an autoencoder
    last_ck = time.time()
    if st["phase"] == 0:
        vae.train()
        run = []
        while st["vae_seconds"] < vae_minutes * 60:
            t0 = time.time()
            x, _ = world_batch(train_seeds(st["vae_step"], batch, 0))
            for g in opt_vae.param_groups:
                g["lr"] = _lr(st["vae_step"], 1e-3, 100)
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
            mse = torch.nn.functional.mse_loss(rec, x)
            kl = post.kl().mean() / x[0].numel()
            loss = mse + 1e-4 * kl
            opt_vae.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt_vae.step()
            run.append(mse.item())
            st["vae_step"] += 1
            st["vae_seconds"] += time.time() - t0
            if st["vae_step"] % log_every == 0:
                st["vae_losses"].append([st["vae_step"], float(np.mean(run))])
                print(f"vae step {st['vae_step']} mse {np.mean(run):.5f} ({st['vae_seconds'] / 60:.1f} min)",
                      flush=True)
                run = []
            if time.time() - last_ck > ckpt_every:
                checkpoint()
                last_ck = time.time()
        # latent statistics -> scaling / shift (the pipeline decodes z / scale + shift)
        vae.eval()
        with torch.no_grad():
            x, _ = world_batch(list(range(500_000, 500_512)))
            z = vae.encode(x).latent_dist.mode()
        st["latent_shift"] = float(z.mean())
        st["latent_scale"] = float(1.0 / z.std())
        st["phase"] = 1
        checkpoint()
        last_ck = time.time()
    vae.eval().requires_grad_(False)
    shift, scale = st["latent_shift"], st["latent_scale"]

    # ---- phase 1: flow matching on the transformer + text encoders
    tr.train()
    for m in text_modules(pipe):
        m.train()
    budget = max(0.0, minutes * 60 - st["vae_seconds"])
    run = []
    gen = torch.Generator().manual_seed(seed * 1000 + st["step"])
    while st["diff_seconds"] < budget:
        t0 = time.time()
        x, prompts = world_batch(train_seeds(st["step"], batch, 1))
        drop = torch.rand(batch, generator=gen) < 0.1
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        with torch.no_grad():
            x0 = (vae.encode(x).latent_dist.sample(generator=gen) - shift) * scale
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(batch, generator=gen))
        tt = t.view(-1, 1, 1, 1)
        xt = (1 - tt) * x0 + tt * eps
        pe, pooled = encode_text(pipe, prompts)
        for g in opt.param_groups:
            g["lr"] = _lr(st["step"], 3e-4, 200)
        pred = tr(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=pe, pooled_projections=pooled,
                  return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diff_params, 1.0)
        opt.step()
        run.append(loss.item())
        st["step"] += 1
        st["diff_seconds"] += time.time() - t0
        if st["step"] % log_every == 0:
            st["losses"].append([st["step"], float(np.mean(run))])
            print(f"step {st['step']} loss {np.mean(run):.4f} "
                  f"({(st['vae_seconds'] + st['diff_seconds']) / 60:.1f} min)", flush=True)
            run = []
        if time.time() - last_ck > ckpt_every:
            checkpoint()
            last_ck = time.time()
    checkpoint()
    return save(pipe, st, seed=seed, batch=batch, minutes=minutes, out_dir=out_dir)


def save(pipe: Any, st: dict[str, Any], *, seed: int, batch: int, minutes: float, out_dir: Path) -> dict[str, Any]:
    import diffusers
    import transformers

    pipe.vae.register_to_config(scaling_factor=st["latent_scale"], shift_factor=st["latent_shift"])
    for m in [pipe.vae, pipe.transformer, *text_modules(pipe)]:
        m.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir)
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file() and f.name != "training.json")
    info = {
        "format": FORMAT, "trained": st["step"] > 0, "seed": seed, "batch_size": batch,
        "budget_minutes": minutes, "image_size": IMAGE_SIZE, "latent_shape": [4, IMAGE_SIZE // 2, IMAGE_SIZE // 2],
        "vae": {"steps": st["vae_step"], "samples_seen": st["vae_step"] * batch,
                "minutes": round(st["vae_seconds"] / 60, 2), "mse_curve": st["vae_losses"],
                "scaling_factor": st["latent_scale"], "shift_factor": st["latent_shift"],
                "params": n_params(pipe.vae)},
        "diffusion": {"steps": st["step"], "samples_seen": st["step"] * batch,
                      "minutes": round(st["diff_seconds"] / 60, 2), "loss_curve": st["losses"],
                      "final_loss": st["losses"][-1][1] if st["losses"] else None,
                      "objective": "rectified flow: x_t=(1-t)x0+t*eps, target eps-x0, t~logit-normal, "
                                   "timestep=1000t, text dropout 10% (prompt -> '')"},
        "params": {"transformer": n_params(pipe.transformer), "text_encoder": n_params(pipe.text_encoder),
                   "text_encoder_2": n_params(pipe.text_encoder_2), "text_encoder_3": n_params(pipe.text_encoder_3),
                   "vae": n_params(pipe.vae)},
        "disk_bytes": size, "data": "shapes world train split, make_prompt(scene), render(scene, size=32)",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
    }
    (out_dir / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"saved {out_dir} ({size / 1e6:.1f} MB); diffusion steps {st['step']}, final loss {info['diffusion']['final_loss']}")
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="total training budget (VAE + diffusion)")
    ap.add_argument("--vae-minutes", type=float, default=None, help="VAE phase budget (default min(4, 0.2 x minutes))")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=float, default=60.0, help="seconds between checkpoints")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on shared CPUs)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--ckpt-dir", type=Path, default=CKPT_DIR)
    ap.add_argument("--init-from", type=Path, default=None,
                    help="continue a saved tiny-sd3 (e.g. mmeff/zoo/models/tiny-sd3) when no checkpoint exists; "
                         "--minutes stays the total budget, so it trains for the minutes not yet spent")
    a = ap.parse_args(argv)
    train(a.minutes, a.vae_minutes, a.batch, a.seed, a.ckpt_every, a.fresh, a.out, a.ckpt_dir, a.threads, a.log_every,
          init_from=a.init_from)


if __name__ == "__main__":
    main()
