"""Train ``tiny-wan``: a real :class:`diffusers.WanPipeline`, tiny, on 64x64 moving-shapes videos.

``python -m mmeff.zoo.train_wan --minutes 25`` builds every component from a config (nothing is downloaded):

- **tokenizer**: a T5 (Unigram) tokenizer built in memory with one ``"\u2581word"`` piece per world word
  (sizes, colours, shapes, backgrounds, label words, "a", "on", "and" ...) plus character fallbacks, so a
  ``make_prompt`` prompt is ~1 token per word (at most ~36 with commas and ``</s>``; ``TEXT_LEN`` = 48).
- **text encoder**: ``UMT5EncoderModel`` (2 layers, d_model 64, 4 heads x 16), trained jointly with the
  transformer.
- **VAE**: ``AutoencoderKLWan`` with ``base_dim=16, dim_mult=[1, 2, 2]`` (two downsamples -> 4x spatial),
  ``temperal_downsample=[True, True]`` (4x temporal, which is what the VAE's hard-coded 1 + 4k frame chunking
  needs), ``z_dim=8``, ``scale_factor_spatial=4``. 13 frames at 64x64 px -> latent 8 x 4 x 16 x 16. It is
  trained first as a deterministic autoencoder (decode the posterior mean without the output clamp, see
  :func:`decode_unclamped`; MSE + 1e-4 L2 on the means)
  on 5-frame clips (the causal 3-D convs are
  the same for any 1 + 4k frames), then frozen; ``latents_mean``/``latents_std`` are
  set per channel from latent statistics so diffusion latents are ~unit variance.
- **transformer**: ``WanTransformer3DModel`` (4 layers, 4 heads x 16, ffn 256, patch (1, 2, 2), RMS QK-norm):
  the latent grid 4 x 8 x 8 = **256 video tokens** (16 blocks of 16 for block-sparse attention). Trained with
  rectified flow as ``FlowMatchEulerDiscreteScheduler(shift=SHIFT)`` samples it: ``x_t = (1 - t) x0 + t eps``,
  target ``eps - x0``, timestep input ``1000 t``, ``t = shift u / (1 + (shift - 1) u)`` with
  ``u ~ logit-normal(0, 1)``. The prompt is dropped to ``""`` 10% of the time (the pipeline's default negative
  prompt under CFG).

Data: ``render_video(generate_scene(s), 13, seed=s, size=64)`` of train-split seeds. Diffusion latents
(normalised VAE posterior means) of the first ``--pool`` (4096) train videos are cached once the VAE is frozen:
the pool grows by ``--new-per-step`` fresh videos a step (encoding costs ~3x a transformer step on a CPU) and is
sampled at random once full; it is saved beside the checkpoint. EMA weights (decay 0.9995) are what is saved;
the learning rate warms up, then decays along a cosine to 10% over the time budget (``--no-cosine``: constant).
These match ``train_sd3``'s 64px recipe; models shipped before them were trained with a sliding pool of 3000,
no EMA and a constant learning rate (their ``training.json`` ``stages``).

What works / what did not (2-core shared CPU, 1 thread): the transformer trains fast (~0.4 s per batch of 8);
the Wan VAE is the bottleneck (~2-3 s per batch of 4 five-frame clips). Decoding posterior *samples* with a
tiny KL weight stalled at MSE ~0.2; lr 1e-3 diverged; decoding through the output clamp collapsed to the mean
colour. The shipped VAE (6 min, ~165 steps, lr 3e-4, posterior means, unclamped) reaches MSE ~0.08 on
5-frame training clips but generalises poorly to 13-frame videos (blurry blobs): train it longer and on
13-frame clips (``--vae-frames 13``) when more CPU time is available.

**Joint image-video training** (``--vae-image-batch``, ``--image-batch``), as Wan itself is trained: one-frame
clips of the scenes (still-image prompts, no motion words) are added to every VAE step and make every other
diffusion step. The causal VAE encodes and decodes a video's first frame alone, and video-only training left
that path poor: a layout candidate's round trip kept the named colours in 31% of first frames against 94% of
middle frames; about 150 steps with one-frame clips raised it to 94% (``docs/diffusion-testbed.md``).

**Growing the transformer** (``--init-from <model> --grow BLOCKS FFN``): the saved model's transformer is replaced
by a deeper, wider copy that computes the same function (:mod:`mmeff.zoo.grow_transformer`: new blocks with zero
residual outputs, FFN units with zero output weights), recorded as a stage; training then goes on from there
instead of from scratch. ``--heads N`` (twice the saved model's heads) widens it the same way
(:mod:`mmeff.zoo.widen_transformer`: heads and hidden channels duplicated, reading weights split at random), after
any ``--grow``. ``--pool-from <checkpoint folder>`` reuses that run's latent pools (same frozen VAE).
A checkpoint remembers its transformer's size, so resuming rebuilds it.

Training is time-bounded and resumable: a checkpoint (model, optimiser, EMA, counters, RNG; the latent pool
beside it) goes to ``.zoo_ckpt/tiny-wan/ckpt.pt`` every ``--ckpt-every`` seconds; rerunning continues until the
total budget ``--minutes`` (compute seconds, VAE + diffusion) is spent (``--fresh`` starts over; ``--export``
saves the checkpoint's EMA pipeline without training). ``--init-from`` continues a saved model as a new
*stage* (fresh optimiser: the warm-up and cosine restart at its step and minutes). ``--device cuda --amp`` trains
on a GPU under bf16 autocast (``mmeff.zoo.train_gpu`` runs it in one timed call); checkpoints are device-free.
The pipeline is saved to ``mmeff/zoo/models/tiny-wan/`` with ``save_pretrained`` plus ``training.json``
(``runs``: device, batch, lr and steps of every run; ``stages``: the hand-written history before runs were
recorded). Load it with :func:`mmeff.zoo.load_video.load_video_pipeline`
and call it with :data:`mmeff.zoo.load_video.TINY_WAN_CALL` (64 px, 13 frames, ``max_sequence_length=48``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import string
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .grow_transformer import arch_of, grow_wan_transformer
from .saved_meta import read_training_json
from .train_common import (
    EMA,
    Deadline,
    LatentPool,
    autocast,
    object_mask,
    random_crops,
    render_chunks,
    resolve_device,
    samples_seen,
    save_ckpt,
    stage_lr,
)
from .widen_transformer import widen_wan_transformer

ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = Path(__file__).resolve().parent / "models"
OUT_DIR = MODELS_DIR / "tiny-wan"
CKPT_DIR = ROOT / ".zoo_ckpt" / "tiny-wan"
SIZE = 64
FRAMES = 13
TEXT_LEN = 48
Z_DIM = 8
SHIFT = 3.0
VAE_FRAMES = 5  # the causal VAE is trained on 1 + 4 frame clips (same weights, 2.6x cheaper)
POOL_SIZE = 4096  # cached diffusion latents (videos); 8 x 4 x 16 x 16 fp16 = 16 KB each
EMA_DECAY = 0.9995
LAYERS = 4  # transformer blocks of a freshly built tiny-wan
FFN_DIM = 256
HEADS = 4  # attention heads of 16 channels (hidden size 64)
FORMAT = "mmeff.zoo.tiny-wan/1"
_CHARS = list(string.ascii_lowercase + string.digits) + [",", '"', "."]


# ---------------------------------------------------------------------------------------------- components
def world_vocabulary(data: str = "world") -> list[str]:
    """Every word a prompt of ``data`` (``"world"`` or ``"layout"``) can contain (lower case). The layout
    words come last, so a world word keeps its token id."""
    from .world import BACKGROUNDS, COLOURS, SHAPES, SIZES, WORDS
    from .world.layout import LAYOUT_WORDS

    words = ["a", "an", "on", "and", "background", "labelled"]
    words += list(SIZES) + list(COLOURS) + list(SHAPES) + list(BACKGROUNDS) + [w.lower() for w in WORDS]
    if data == "layout":
        words += list(LAYOUT_WORDS)
    return list(dict.fromkeys(words))


def tokenizer(data: str = "world") -> Any:
    """T5 Unigram tokenizer: one piece per word of ``data``'s prompts, character fallbacks (in memory)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -6.0) for c in _CHARS] + [("\u2581" + c, -6.0) for c in _CHARS]
    seen = {p for p, _ in vocab}
    vocab += [("\u2581" + w, -1.0) for w in world_vocabulary(data) if "\u2581" + w not in seen]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=TEXT_LEN)


def build_vae(seed: int = 0) -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=16, z_dim=Z_DIM, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
                            temperal_downsample=[True, True], dropout=0.0, latents_mean=[0.0] * Z_DIM,
                            latents_std=[1.0] * Z_DIM, scale_factor_temporal=4, scale_factor_spatial=4)


def build_pipeline(seed: int = 0, data: str = "world", num_layers: int = LAYERS, ffn_dim: int = FFN_DIM,
                   num_attention_heads: int = HEADS) -> Any:
    """A freshly initialised tiny Wan pipeline (VAE untrained as well) for ``data``'s prompts; the transformer
    has ``num_layers`` blocks of FFN width ``ffn_dim`` and ``num_attention_heads`` heads of 16 channels (larger
    after :mod:`mmeff.zoo.grow_transformer` and :mod:`mmeff.zoo.widen_transformer`)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    tok = tokenizer(data)
    torch.manual_seed(seed + 1)
    te = UMT5EncoderModel(UMT5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=len(tok),
                                     relative_attention_num_buckets=16, dropout_rate=0.0))
    torch.manual_seed(seed + 2)
    tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=num_attention_heads, attention_head_dim=16,
                               in_channels=Z_DIM,
                               out_channels=Z_DIM, text_dim=64, freq_dim=64, ffn_dim=ffn_dim, num_layers=num_layers,
                               cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    pipe = WanPipeline(tokenizer=tok, text_encoder=te, vae=build_vae(seed), transformer=tr,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------- data
def video_frames_and_prompt(seed: int, frames: int = FRAMES, data: str = "world") -> tuple[list[Any], str]:
    """The per-frame scenes of video ``seed`` and its prompt. ``"world"``: a world scene bouncing with random
    velocities, ``make_prompt``; ``"layout"``: a layout scene whose objects move in the directions its prompt
    names (:func:`mmeff.zoo.world.layout.make_layout_prompt`)."""
    from .world import generate_scene, make_prompt, video_scenes
    from .world.layout import (
        generate_layout_scene,
        layout_video_scenes,
        make_layout_prompt,
    )

    if data == "layout":
        scene = generate_layout_scene(seed)
        per_frame, dirs = layout_video_scenes(scene, frames)
        return per_frame, make_layout_prompt(scene, dirs)
    scene = generate_scene(seed)
    return video_scenes(scene, frames, seed=seed), make_prompt(scene)


def world_video_arrays(seeds: list[int], size: int = SIZE, frames: int = FRAMES,
                       data: str = "world") -> tuple[np.ndarray, list[str]]:
    """Videos (``[B, frames, size, size, 3]`` uint8) and prompts of scenes ``seeds`` (see
    :func:`video_frames_and_prompt`)."""
    from .world import render

    videos, prompts = [], []
    for s in seeds:
        per_frame, prompt = video_frames_and_prompt(s, frames, data)
        videos.append(np.stack([np.asarray(render(f, size=size), dtype=np.uint8) for f in per_frame]))
        prompts.append(prompt)
    return np.stack(videos), prompts


def to_unit(arr: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, T, H, W, 3]`` -> float ``[B, 3, T, H, W]`` in [-1, 1]."""
    return (torch.from_numpy(arr).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0).contiguous()


def world_videos(seeds: list[int], size: int = SIZE, frames: int = FRAMES,
                 data: str = "world") -> tuple[torch.Tensor, list[str]]:
    """Videos in [-1, 1] (``[B, 3, frames, size, size]``) and prompts of scenes ``seeds``."""
    arr, prompts = world_video_arrays(seeds, size, frames, data)
    return to_unit(arr), prompts


def still_image_arrays(seeds: list[int], size: int = SIZE, data: str = "world") -> tuple[np.ndarray, list[str]]:
    """One-frame videos (``[B, 1, size, size, 3]`` uint8) of scenes ``seeds`` and their still-image prompts (no
    motion words: one frame cannot show a direction). Wan trains on images as one-frame videos; the causal VAE
    encodes a video's first frame alone, so these train exactly the first-frame path."""
    from .train_sd3 import world_images

    arr, prompts = world_images(seeds, size, data)  # the text-to-image trainer's renders and prompts
    return arr[:, None], prompts


def train_seeds(step: int, batch: int, phase: int) -> list[int]:
    """Train-split scene seeds of one batch (phase 0: VAE, 1: diffusion; different orders)."""
    n = 1_000_000
    start = (step * batch * 7919 + phase * 499_979 + 123_457) % n
    return [(start + i) % n for i in range(batch)]


def pool_seeds(first: int, count: int) -> list[int]:
    """Train-split seeds ``first .. first + count`` of the latent pool's bulk fill (``render_workers`` > 1)."""
    return [(623_436 + i) % 1_000_000 for i in range(first, first + count)]


def video_object_weight(x: torch.Tensor, weight: float) -> torch.Tensor:
    """``[B, 1, T, H, W]``: 1 + ``weight`` on pixels that differ from their frame's background (0: all ones)."""
    if not weight:
        return torch.ones_like(x[:, :1])
    b, c, t, h, w = x.shape
    m = object_mask(x.transpose(1, 2).reshape(b * t, c, h, w)).view(b, t, 1, h, w).transpose(1, 2)
    return 1.0 + weight * m


def encode_text(pipe: Any, prompts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """The pipeline's own prompt encoding (with gradients), padded to ``TEXT_LEN``."""
    pe, _ = pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN,
                               device=torch.device(device))
    return pe


def decode_unclamped(vae: Any, z: torch.Tensor) -> torch.Tensor:
    """``AutoencoderKLWan`` decoding without the final clamp to [-1, 1] (training only).

    The shapes world is full of pure white / black pixels (exactly +-1): through the clamp, every output that
    overshoots gets zero gradient, and the VAE collapsed to the mean colour in our first runs. Same frame-by-frame
    causal loop (feature cache) as the model's own decode.
    """
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    outs = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        outs.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                first_chunk=(i == 0)))
    vae.clear_cache()
    return torch.cat(outs, 2)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def load_saved(pipe: Any, folder: Path, vae_minutes: float, data: str | None = None) -> dict[str, Any]:
    """Copy a saved tiny-wan pipeline's weights into ``pipe`` and return the training state its
    ``training.json`` records. The VAE phase resumes when ``vae_minutes`` exceeds the minutes the
    saved VAE had (its latent statistics are then measured again before diffusion goes on). The continuation
    is a new *stage*: its warm-up and cosine schedule start at the saved step and minutes."""
    from diffusers import WanPipeline

    meta = read_training_json(folder, FORMAT, "train_wan")
    saved_data = meta.get("prompt_family", "world")
    data = data or saved_data
    saved = WanPipeline.from_pretrained(folder)
    # other prompts, other tokenizer: the text encoder starts fresh (the transformer and VAE are kept)
    kept = ("vae", "transformer", "text_encoder") if data == saved_data else ("vae", "transformer")
    for name in kept:
        getattr(pipe, name).load_state_dict(getattr(saved, name).state_dict())
    vae, diff = meta["vae"], meta["diffusion"]
    return {"phase": 0 if vae_minutes > vae["minutes"] else 1, "vae_step": vae["steps"],
            "vae_seconds": vae["minutes"] * 60, "vae_losses": vae["mse_curve"], "step": diff["steps"],
            "diff_seconds": diff["minutes"] * 60, "losses": diff["loss_curve"],
            "latents_mean": vae["latents_mean"], "latents_std": vae["latents_std"],
            "vae_frames": vae.get("clip_frames", VAE_FRAMES), "initialised_from": str(folder),
            "stages": list(meta.get("stages", [])) + ([] if data == saved_data else [
                {"name": f"{saved_data} prompts", "from": str(folder), "kept": list(kept),
                 "vae_steps": vae["steps"], "diffusion_steps": diff["steps"],
                 "minutes": round(vae["minutes"] + diff["minutes"], 2)}]),
            "runs": list(meta.get("runs", [])),
            **({"decoder_finetune": meta["decoder_finetune"]} if meta.get("decoder_finetune") else {}),
            # joint image-video counts carry across stages
            "image_steps": diff.get("image_steps", 0), "image_samples": diff.get("image_samples_seen", 0),
            "samples_before": diff.get("samples_seen", diff["steps"] * diff.get("batch_size", 8)),
            "runs_counted_from": len(meta.get("runs", [])),
            "stage": {"step": diff["steps"], "seconds": diff["minutes"] * 60,
                      "vae_step": vae["steps"], "init_from": str(folder)}}


def saved_arch(ck: dict[str, Any] | None, init_from: Path | None) -> dict[str, int]:
    """Transformer size to build: the checkpoint's, else the ``init_from`` model's, else a fresh tiny-wan's
    (checkpoints written before widening existed have ``HEADS`` heads)."""
    fresh = {"num_layers": LAYERS, "ffn_dim": FFN_DIM, "num_attention_heads": HEADS}
    if ck is not None:
        return {**fresh, **ck["state"].get("transformer_arch", {})}
    if init_from is not None:
        cfg = json.loads((Path(init_from) / "transformer" / "config.json").read_text())
        return {k: int(cfg[k]) for k in fresh}
    return fresh


def grow_pipeline_transformer(pipe: Any, st: dict[str, Any], grow_to: tuple[int, int], seed: int) -> None:
    """Replace ``pipe.transformer`` by its function-preserving growth to ``grow_to`` (blocks, FFN width) and
    record it as a stage."""
    before = arch_of(pipe.transformer)
    pipe.transformer = grow_wan_transformer(pipe.transformer, grow_to[0], grow_to[1], seed)
    st["stages"] = list(st.get("stages", [])) + [
        {"name": "transformer grown", "from": before, "to": arch_of(pipe.transformer), "at_step": st["step"],
         "how": "mmeff.zoo.grow_transformer: new blocks with zero residual outputs, FFN units with zero outputs"}]
    print(f"transformer grown from {before} to {arch_of(pipe.transformer)} "
          f"({n_params(pipe.transformer)} parameters)", flush=True)


def widen_pipeline_transformer(pipe: Any, st: dict[str, Any], seed: int) -> None:
    """Replace ``pipe.transformer`` by its function-preserving widening to twice the heads and record it as a
    stage."""
    before = arch_of(pipe.transformer)
    pipe.transformer = widen_wan_transformer(pipe.transformer, seed)
    st["stages"] = list(st.get("stages", [])) + [
        {"name": "transformer widened", "from": before, "to": arch_of(pipe.transformer), "at_step": st["step"],
         "how": "mmeff.zoo.widen_transformer: heads and hidden channels duplicated, reading weights split "
                "r / (1 - r) at random"}]
    print(f"transformer widened from {before['num_attention_heads']} to "
          f"{arch_of(pipe.transformer)['num_attention_heads']} heads ({n_params(pipe.transformer)} parameters)",
          flush=True)


def seed_pools(folder: Path, pool: LatentPool, image_pool: LatentPool, st: dict[str, Any]) -> None:
    """Load the video and image latent pools saved in ``folder`` (same frozen VAE) into a new stage's pools."""
    pools = ((pool, "latent_pool.pt"), (image_pool, "image_latent_pool.pt"))
    for _, name in pools:  # both or neither
        if not (folder / name).exists():
            raise SystemExit(f"--pool-from {folder}: no {name} there; pass the checkpoint folder of the run that "
                             "trained --init-from, or drop --pool-from")
    for p, name in pools:
        p.load(folder / name)
        del p.latents[p.size:], p.prompts[p.size:]
        p.dirty = True
    st["pools_seeded_from"] = str(folder)
    print(f"latent pools seeded from {folder}: {len(pool)} videos, {len(image_pool)} images", flush=True)


# ---------------------------------------------------------------------------------------------- training
def train(minutes: float, vae_minutes: float | None = None, batch: int = 8, vae_batch: int = 4, seed: int = 0,
          ckpt_every: float = 60.0, fresh: bool = False, out_dir: Path = OUT_DIR, ckpt_dir: Path = CKPT_DIR,
          threads: int | None = None, log_every: int = 25, lr: float = 5e-4,
          new_per_step: int = 2, vae_lr: float = 3e-4, vae_frames: int | None = None,
          init_from: Path | None = None, *, export_only: bool = False, ema: float = EMA_DECAY,
          pool_size: int = POOL_SIZE, cosine: bool = True, warmup: int = 100, vae_object_weight: float = 0.0,
          device: str | None = "cpu", amp: bool = False, deadline: float | None = None,
          render_workers: int = 0, max_steps: int | None = None, data: str | None = None,
          vae_crop: int | None = None, vae_image_batch: int = 0, image_batch: int = 0,
          grow_to: tuple[int, int] | None = None, pool_from: Path | None = None,
          heads: int | None = None) -> dict[str, Any]:
    """Train (or resume) tiny-wan until ``minutes`` in total are spent (VAE, then diffusion);
    ``init_from`` (a saved tiny-wan folder) continues that model, its minutes counted in the total.
    ``export_only`` saves the checkpoint's (EMA) pipeline to ``out_dir`` without training.

    Diffusion latents (posterior means, normalised) of the first ``pool_size`` train videos are cached, grown
    ``new_per_step`` per step (``render_workers`` > 1: rendered in bulk by that many processes) and sampled once
    full; EMA weights (``ema`` decay, 0: none) are what is saved; the learning rate warms up over ``warmup``
    steps, then (``cosine``) decays to 10% over the time budget, both per stage. ``vae_object_weight`` weights
    object pixels in the VAE loss (train_sd3's 64px recipe uses 9); ``vae_crop`` trains the VAE on random
    square crops of that many pixels (the same crop for every frame of a clip). ``device``, ``amp``,
    ``deadline`` as in :func:`mmeff.zoo.train_sd3.train`; ``max_steps`` stops at that diffusion step.
    ``data`` is the prompt family (``"world"``, ``"layout"``); default: the checkpoint's, the ``init_from``
    model's, or ``"world"``.

    Joint image-video training (as Wan itself is trained): ``vae_image_batch`` > 0 adds to every VAE step the
    loss on that many full-size one-frame videos (:func:`still_image_arrays`), which is the causal VAE's
    first-frame path; ``image_batch`` > 0 makes every other diffusion step one on that many one-frame latents
    with still-image prompts (their own pool, ``image_latent_pool.pt``).

    ``grow_to`` = (blocks, FFN width) grows the ``init_from`` model's transformer to that size without changing
    its function (:mod:`mmeff.zoo.grow_transformer`) before the new stage trains it; ``heads`` (twice the
    ``init_from`` model's) then widens it the same way (:mod:`mmeff.zoo.widen_transformer`). ``pool_from`` (a
    checkpoint folder of a run on the same frozen VAE, such as the one that trained ``init_from``) seeds the
    latent pools of a new stage, which otherwise grow a few encodes per step."""
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    stop = Deadline(deadline)
    vae_minutes = min(5.0, 0.2 * minutes) if vae_minutes is None else vae_minutes
    ckpt_path = ckpt_dir / "ckpt.pt"
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False) if ckpt_path.exists() and not fresh else None
    if data is None:
        data = ((ck or {}).get("state", {}).get("data")
                or (read_training_json(Path(init_from), FORMAT, "train_wan").get("prompt_family") if init_from else None)
                or "world")
    arch = saved_arch(ck, init_from)
    if ck is not None and grow_to is not None and tuple(grow_to) != (arch["num_layers"], arch["ffn_dim"]):
        raise SystemExit(f"the checkpoint in {ckpt_dir} has a {arch} transformer; it cannot be grown while resuming: "
                         "export it (--export) and grow the export with --init-from, or drop --grow")
    if heads is not None and heads != arch["num_attention_heads"]:
        if ck is not None:
            raise SystemExit(f"the checkpoint in {ckpt_dir} has a {arch} transformer; it cannot be widened while "
                             "resuming: export it (--export) and widen the export with --init-from, or drop --heads")
        if init_from is None:
            raise SystemExit("--heads widens a saved model: give --init-from <saved tiny-wan folder>")
        if heads != 2 * arch["num_attention_heads"]:
            raise SystemExit(f"--heads {heads}: widening doubles the heads, so give {2 * arch['num_attention_heads']} "
                             f"(the saved model has {arch['num_attention_heads']})")
    torch.manual_seed(seed)
    pipe = build_pipeline(seed, data, **arch)
    vae, te = pipe.vae, pipe.text_encoder
    st: dict[str, Any] = {"phase": 0, "vae_step": 0, "step": 0, "vae_seconds": 0.0, "diff_seconds": 0.0,
                          "vae_losses": [], "losses": [], "latents_mean": [0.0] * Z_DIM,
                          "latents_std": [1.0] * Z_DIM, "threads": [], "runs": [],
                          "stage": {"step": 0, "seconds": 0.0, "vae_step": 0}}
    pool = LatentPool(pool_size)
    pool_path = ckpt_dir / "latent_pool.pt"
    image_pool = LatentPool(pool_size)
    image_pool_path = ckpt_dir / "image_latent_pool.pt"
    if ck is not None:
        for name, mod in (("vae", vae), ("transformer", pipe.transformer), ("text_encoder", te)):
            mod.load_state_dict(ck[name])
        st.update(ck["state"])
        st.setdefault("stage", {"step": 0, "seconds": 0.0, "vae_step": 0})
        torch.set_rng_state(ck["rng"])
        pool.load(pool_path)
        image_pool.load(image_pool_path)
        print(f"resumed from {ckpt_path}: phase {st['phase']}, vae_step {st['vae_step']}, step {st['step']}, "
              f"pool {len(pool)}" + (" (--pool-from ignored: the checkpoint's own pools are kept)"
                                     if pool_from is not None else ""), flush=True)
    elif init_from is not None:
        st.update(load_saved(pipe, Path(init_from), vae_minutes, data))
        print(f"continuing {init_from}: phase {st['phase']}, vae_step {st['vae_step']}, diffusion step "
              f"{st['step']}, {(st['vae_seconds'] + st['diff_seconds']) / 60:.1f} of {minutes:.0f} min spent",
              flush=True)
        if grow_to is not None and tuple(grow_to) != (arch["num_layers"], arch["ffn_dim"]):
            grow_pipeline_transformer(pipe, st, grow_to, seed)
        if heads is not None and heads != arch["num_attention_heads"]:
            widen_pipeline_transformer(pipe, st, seed)
        if pool_from is not None:
            seed_pools(Path(pool_from), pool, image_pool, st)
    tr = pipe.transformer
    learned = {"transformer": tr, "text_encoder": te}
    st["transformer_arch"] = arch_of(tr)
    pipe.to(dev)
    diff_params = [p for m in learned.values() for p in m.parameters()]
    opt_vae = torch.optim.AdamW(vae.parameters(), lr=vae_lr, weight_decay=0.0)
    opt = torch.optim.AdamW(diff_params, lr=lr, weight_decay=0.01)
    if ck is not None:
        if ck.get("opt_vae"):  # GPU bundles drop it once the VAE is frozen
            opt_vae.load_state_dict(ck["opt_vae"])
        opt.load_state_dict(ck["opt"])
    averager = EMA(learned, ema) if ema > 0 else None
    if averager is not None and ck is not None and ck.get("ema"):
        averager.load(ck["ema"], dev)
    st["threads"] = list(st.get("threads", [])) + [torch.get_num_threads()]
    st["new_per_step"] = new_per_step
    st["data"] = data
    # an explicit clip length wins over the checkpoint's / saved model's (default: theirs, or VAE_FRAMES)
    st["vae_frames"] = vae_frames if vae_frames is not None else st.get("vae_frames", VAE_FRAMES)
    st["recipe_config"] = {"batch": batch, "vae_batch": vae_batch, "lr": lr, "vae_lr": vae_lr, "ema": ema,
                           "pool": pool_size, "new_per_step": new_per_step, "cosine": cosine, "warmup": warmup,
                           "vae_frames": st["vae_frames"], "vae_object_weight": vae_object_weight, "vae_crop": vae_crop,
                           "data": data, "vae_image_batch": vae_image_batch, "image_batch": image_batch}
    run_info = {"device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev), "amp": bool(amp),
                "batch": batch, "vae_batch": vae_batch, "lr": lr, "pool": pool_size, "threads": torch.get_num_threads(),
                "from_step": st["step"], "to_step": st["step"], "from_vae_step": st["vae_step"],
                "to_vae_step": st["vae_step"], "minutes": 0.0}
    st["runs"] = list(st.get("runs", [])) + [run_info]
    t_run = time.time()

    def checkpoint() -> None:
        run_info.update(to_step=st["step"], to_vae_step=st["vae_step"], minutes=round((time.time() - t_run) / 60, 2))
        save_ckpt(ckpt_path, {"vae": vae.state_dict(), "transformer": tr.state_dict(), "text_encoder": te.state_dict(),
                              "opt_vae": opt_vae.state_dict(), "opt": opt.state_dict(), "state": st,
                              "rng": torch.get_rng_state(), "ema": None if averager is None else averager.state()})
        pool.save(pool_path)
        image_pool.save(image_pool_path)

    def finish() -> dict[str, Any]:
        if averager is not None:
            averager.copy_to(learned)
        pipe.to("cpu")
        return save(pipe, st, seed=seed, batch=batch, vae_batch=vae_batch, minutes=minutes, out_dir=out_dir,
                    ema=ema)

    if export_only:
        if ck is None:
            raise FileNotFoundError(f"no checkpoint to export at {ckpt_path}")
        st["runs"].pop()  # exporting is no training run
        return finish()

    last_ck = time.time()
    # ---- phase 0: the VAE as an autoencoder
    if st["phase"] == 0:
        vae.train()
        run: list[float] = []
        while st["vae_seconds"] < vae_minutes * 60 and not stop.passed():
            t0 = time.time()
            x, _ = world_videos(train_seeds(st["vae_step"], vae_batch, 0), frames=st["vae_frames"], data=data)
            x = x.to(dev)
            weight = video_object_weight(x, vae_object_weight)
            if vae_crop:
                xw = random_crops(torch.cat([x, weight], 1), vae_crop, st["vae_step"])
                x, weight = xw[:, :3], xw[:, 3:]
            for g in opt_vae.param_groups:
                g["lr"] = stage_lr(vae_lr, st["vae_step"], 0.0, 1.0, 20, False,
                                   {"step": st["stage"].get("vae_step", 0)})
            post = vae.encode(x).latent_dist
            # Deterministic autoencoder (decode the posterior mean): with the posterior std starting at 1 and a
            # tiny KL weight, decoding samples left the MSE stuck at ~0.2 for the few hundred steps a CPU
            # affords. Diffusion uses posterior means anyway; a small L2 on the means keeps their scale bounded.
            rec = decode_unclamped(vae, post.mean)
            mse = torch.nn.functional.mse_loss(rec, x)
            loss = (weight * (rec - x) ** 2).mean() + 1e-4 * post.mean.pow(2).mean()
            if vae_image_batch:
                xi = to_unit(still_image_arrays(train_seeds(st["vae_step"], vae_image_batch, 2), data=data)[0]).to(dev)
                post_i = vae.encode(xi).latent_dist
                rec_i = decode_unclamped(vae, post_i.mean)
                loss = loss + ((video_object_weight(xi, vae_object_weight) * (rec_i - xi) ** 2).mean()
                               + 1e-4 * post_i.mean.pow(2).mean())
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
        if stop.passed() and st["vae_seconds"] < vae_minutes * 60:  # cut short: the VAE resumes next time
            checkpoint()
            return finish()
        vae.eval()
        with torch.no_grad():  # per-channel latent statistics of 64 train videos -> latents_mean / latents_std
            zs = [vae.encode(world_videos(list(range(900_000 + 16 * i, 900_000 + 16 * (i + 1))), data=data)[0].to(dev))
                  .latent_dist.mode() for i in range(4)]
            z = torch.cat(zs)
        st["latents_mean"] = z.mean(dim=(0, 2, 3, 4)).tolist()
        st["latents_std"] = z.std(dim=(0, 2, 3, 4)).tolist()
        st["phase"] = 1
        pool = LatentPool(pool_size)  # latents of an earlier VAE are stale
        image_pool = LatentPool(pool_size)
        checkpoint()
        last_ck = time.time()
    vae.eval().requires_grad_(False)
    mean = torch.tensor(st["latents_mean"], device=dev).view(1, -1, 1, 1, 1)
    std = torch.tensor(st["latents_std"], device=dev).view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def encode_videos(arr: np.ndarray) -> torch.Tensor:
        """Normalised posterior means ``(mu - latents_mean) / latents_std`` of uint8 videos."""
        zs = [vae.encode(to_unit(arr[i:i + 32]).to(dev)).latent_dist.mean for i in range(0, len(arr), 32)]
        return (torch.cat(zs) - mean) / std

    # ---- phase 1: flow matching on the transformer + text encoder
    tr.train()
    te.train()
    budget = max(0.0, minutes * 60 - st["vae_seconds"])
    if not pool.full and render_workers > 1 and st["diff_seconds"] < budget:
        seeds = pool_seeds(len(pool), pool.size - len(pool))
        t0 = time.time()
        try:
            for arr, prompts in render_chunks(partial(world_video_arrays, data=data), seeds, 64, render_workers):
                pool.add(encode_videos(arr), prompts)
        except Exception as e:  # noqa: BLE001 - a one-shot GPU call goes on growing the pool step by step instead
            print(f"bulk pool fill failed ({type(e).__name__}: {e}); growing it per step", flush=True)
        print(f"latent pool: {len(pool)} videos after {time.time() - t0:.1f} s of bulk rendering", flush=True)
    run = []
    gen = torch.Generator().manual_seed(seed * 1000 + st["step"])
    # The (frozen) VAE's encoding costs ~3x a transformer step on a CPU, so until the pool is full each step
    # encodes only ``new_per_step`` fresh train videos into it (and trains on them with a random rest).
    while st["diff_seconds"] < budget and not stop.passed() and (max_steps is None or st["step"] < max_steps):
        t0 = time.time()
        still = bool(image_batch) and st["step"] % 2 == 1
        src, n = (image_pool, image_batch) if still else (pool, batch)
        fresh_n = 0
        if not src.full:
            grow = 4 * new_per_step if still else new_per_step  # one-frame encodes are ~13x cheaper
            make = partial(still_image_arrays, data=data) if still else partial(world_video_arrays, data=data)
            arr, pr = make(train_seeds(st["step"], grow, 3 if still else 1))
            src.add(encode_videos(arr), pr)
            fresh_n = min(grow, n)
        x0, prompts = src.sample(n, gen)
        if fresh_n:
            x0[:fresh_n] = torch.stack(src.latents[-fresh_n:]).float()
            prompts[:fresh_n] = src.prompts[-fresh_n:]
        drop = torch.rand(n, generator=gen) < 0.1
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        eps = torch.randn(x0.shape, generator=gen).to(dev)
        u = torch.sigmoid(torch.randn(n, generator=gen))
        t = (SHIFT * u / (1 + (SHIFT - 1) * u)).to(dev)
        x0 = x0.to(dev)
        tt = t.view(-1, 1, 1, 1, 1)
        xt = (1 - tt) * x0 + tt * eps
        for g in opt.param_groups:
            g["lr"] = stage_lr(lr, st["step"], st["diff_seconds"], budget, warmup, cosine, st["stage"])
        with autocast(dev, amp):
            pe = encode_text(pipe, prompts, dev)
            pred = tr(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=pe, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diff_params, 1.0)
        opt.step()
        if averager is not None:
            averager.update(learned, st["step"])
        run.append(loss.detach())
        st["step"] += 1
        st["image_steps"] = st.get("image_steps", 0) + int(still)
        st["image_samples"] = st.get("image_samples", 0) + (n if still else 0)
        st["diff_seconds"] += time.time() - t0
        if st["step"] % log_every == 0:
            m = float(torch.stack(run).mean())
            st["losses"].append([st["step"], m])
            print(f"step {st['step']} loss {m:.4f} pool {len(pool)}"
                  + (f" images {len(image_pool)}" if image_batch else "") + " "
                  f"({(st['vae_seconds'] + st['diff_seconds']) / 60:.1f} min)", flush=True)
            run = []
        if time.time() - last_ck > ckpt_every:
            checkpoint()
            last_ck = time.time()
    checkpoint()
    return finish()


def save(pipe: Any, st: dict[str, Any], *, seed: int, batch: int, vae_batch: int, minutes: float,
         out_dir: Path, ema: float = 0.0) -> dict[str, Any]:
    import diffusers
    import transformers

    pipe.vae.register_to_config(latents_mean=[float(v) for v in st["latents_mean"]],
                                latents_std=[float(v) for v in st["latents_std"]])
    for m in (pipe.vae, pipe.transformer, pipe.text_encoder):
        m.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    backend = pipe.tokenizer.backend_tokenizer  # encoding left its padding/truncation state set; ship it clean
    backend.no_padding()
    backend.no_truncation()
    pipe.save_pretrained(out_dir)
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file() and f.name != "training.json")
    lat = [Z_DIM, (FRAMES - 1) // 4 + 1, SIZE // 4, SIZE // 4]
    runs = st.get("runs", [])
    samples = samples_seen(st, batch)
    info = {
        "format": FORMAT, "trained": st["step"] > 0, "seed": seed, "prompt_family": st.get("data", "world"),
        "video": {"frames": FRAMES, "height": SIZE, "width": SIZE, "fps_note": "world frames, no fps"},
        "latent_shape": lat, "token_grid": [lat[1], lat[2] // 2, lat[3] // 2],
        "video_tokens": lat[1] * (lat[2] // 2) * (lat[3] // 2), "text_len": TEXT_LEN, "scheduler_shift": SHIFT,
        "recipe_config": st.get("recipe_config"),
        "vae": {"steps": st["vae_step"], "batch_size": vae_batch, "clip_frames": st.get("vae_frames", VAE_FRAMES),
                "samples_seen": st["vae_step"] * vae_batch,
                "minutes": round(st["vae_seconds"] / 60, 2), "mse_curve": st["vae_losses"],
                "final_mse": st["vae_losses"][-1][1] if st["vae_losses"] else None,
                "latents_mean": st["latents_mean"], "latents_std": st["latents_std"], "params": n_params(pipe.vae),
                "config": "AutoencoderKLWan(base_dim=16, z_dim=8, dim_mult=[1,2,2], num_res_blocks=1, "
                          "temperal_downsample=[True,True], scale_factor_spatial=4): 4x spatial, 4x temporal"},
        "diffusion": {"steps": st["step"], "batch_size": batch, "samples_seen": samples,
                      **({"image_steps": st["image_steps"],
                          "video_samples_seen": samples - st["image_steps"] * batch,
                          "image_samples_seen": st.get("image_samples", st["image_steps"]
                                                       * (st.get("recipe_config") or {}).get("image_batch", 0))}
                         if st.get("image_steps") else {}),
                      "minutes": round(st["diff_seconds"] / 60, 2), "loss_curve": st["losses"],
                      "final_loss": st["losses"][-1][1] if st["losses"] else None,
                      "objective": "rectified flow: x_t=(1-t)x0+t*eps, target eps-x0, timestep=1000t, "
                                   f"t=shift*u/(1+(shift-1)u), u~logit-normal(0,1), shift={SHIFT}, "
                                   "prompt dropout 10% (prompt -> '')",
                      "weights": f"EMA (decay {ema})" if ema else "last step"},
        "params": {"transformer": n_params(pipe.transformer), "text_encoder": n_params(pipe.text_encoder),
                   "vae": n_params(pipe.vae)},
        "total_minutes": round((st["vae_seconds"] + st["diff_seconds"]) / 60, 2), "budget_minutes": minutes,
        "torch_threads": st.get("threads", []),
        **({"initialised_from": st["initialised_from"]} if st.get("initialised_from") else {}),
        "stages": st.get("stages", []), "stage": st.get("stage"), "runs": runs,
        **({"decoder_finetune": st["decoder_finetune"]} if st.get("decoder_finetune") else {}),
        "disk_bytes": size,
        "data": (f"layout scenes of the world's train split moving in named directions, {FRAMES} frames, "
                 f"size {SIZE}, make_layout_prompt(scene, directions)" if st.get("data") == "layout" else
                 f"shapes world train split: render_video(generate_scene(s), {FRAMES}, seed=s, size={SIZE}), "
                 "make_prompt(scene)"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "devices": sorted({r["device"] for r in runs}) or ["cpu"]},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
    }
    (out_dir / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"saved {out_dir} ({size / 1e6:.1f} MB); diffusion steps {st['step']}, "
          f"final loss {info['diffusion']['final_loss']}", flush=True)
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=25.0, help="total training budget (VAE + diffusion)")
    ap.add_argument("--vae-minutes", type=float, default=None, help="VAE phase budget (default min(5, 0.2 x minutes))")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vae-batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4, help="transformer + text encoder learning rate")
    ap.add_argument("--vae-lr", type=float, default=3e-4, help="VAE learning rate (1e-3 diverged)")
    ap.add_argument("--new-per-step", type=int, default=2, help="fresh videos encoded into the latent pool per step")
    ap.add_argument("--pool", type=int, default=POOL_SIZE, help="latent-pool size (videos); sampled once full")
    ap.add_argument("--ema", type=float, default=EMA_DECAY, help="EMA decay of the saved weights (0: last step)")
    ap.add_argument("--no-cosine", action="store_true", help="constant learning rate after the warm-up")
    ap.add_argument("--vae-object-weight", type=float, default=0.0, help="extra VAE loss weight on object pixels")
    ap.add_argument("--vae-frames", type=int, default=None,
                    help=f"frames per VAE training clip (1 + 4k; default: the checkpoint's, or {VAE_FRAMES})")
    ap.add_argument("--vae-crop", type=int, default=None, help="train the VAE on random square crops of this size")
    ap.add_argument("--vae-image-batch", type=int, default=0,
                    help="one-frame images added to every VAE step (trains the causal VAE's first-frame path)")
    ap.add_argument("--image-batch", type=int, default=0,
                    help="every other diffusion step trains on this many one-frame latents (joint image-video)")
    ap.add_argument("--data", choices=["world", "layout"], default=None,
                    help="prompt family (default: the checkpoint's, the --init-from model's, or world)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop at this diffusion step")
    ap.add_argument("--export", action="store_true",
                    help="save the checkpoint's pipeline (EMA weights) to --out without training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=float, default=60.0, help="seconds between checkpoints")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast for the transformer and text encoder (CUDA)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="continue a saved tiny-wan folder (e.g. the shipped one); --minutes counts its minutes too")
    ap.add_argument("--grow", type=int, nargs=2, default=None, metavar=("BLOCKS", "FFN"),
                    help="with --init-from: grow its transformer to this many blocks and FFN width first "
                         "(function-preserving, mmeff.zoo.grow_transformer)")
    ap.add_argument("--heads", type=int, default=None,
                    help="with --init-from: widen its transformer to this many attention heads, twice the saved "
                         "model's (function-preserving, mmeff.zoo.widen_transformer; after --grow)")
    ap.add_argument("--pool-from", type=Path, default=None,
                    help="with --init-from: seed the latent pools from this checkpoint folder (same frozen VAE)")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--ckpt-dir", type=Path, default=CKPT_DIR)
    a = ap.parse_args(argv)
    if (a.grow or a.pool_from or a.heads) and a.init_from is None and not (a.ckpt_dir / "ckpt.pt").exists():
        ap.error("--grow, --heads and --pool-from start a new stage: give --init-from <saved tiny-wan folder>")
    train(a.minutes, a.vae_minutes, a.batch, a.vae_batch, a.seed, a.ckpt_every, a.fresh, a.out, a.ckpt_dir,
          a.threads, a.log_every, a.lr, a.new_per_step, a.vae_lr, a.vae_frames, a.init_from, export_only=a.export,
          ema=a.ema, pool_size=a.pool, cosine=not a.no_cosine, vae_object_weight=a.vae_object_weight,
          device=a.device, amp=a.amp, data=a.data, vae_crop=a.vae_crop, max_steps=a.max_steps,
          vae_image_batch=a.vae_image_batch, image_batch=a.image_batch,
          grow_to=tuple(a.grow) if a.grow else None, pool_from=a.pool_from, heads=a.heads)


if __name__ == "__main__":
    main()
