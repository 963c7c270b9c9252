"""Train ``tiny-sd3``: a real :class:`diffusers.StableDiffusion3Pipeline`, tiny, on shapes-world images.

``python -m mmeff.zoo.train_sd3 --minutes 64 --vae-minutes 14`` builds every component from a config (nothing is
downloaded). Three recipes (:data:`RECIPES`): ``layout64`` (the shipped model: the 64px architecture on layout
prompts, which name each object's cell, continued from a 64px model with ``--init-from``), ``64px`` (the
default for a fresh run; world prompts) and ``32px`` (the first one). Earlier models are recorded in
``training.json``'s ``lineage``; the reasons for 64 px, for layout prompts and for each change are in
``docs/diffusion-testbed.md``. ``mmeff.zoo.decoder_ft`` then sharpens the VAE decoder.

- **tokenizers**: word-level, in memory. Both CLIP tokenizers are BPE models whose merges are learned (with the
  ``tokenizers`` BPE trainer) on the world vocabulary only, so every world word (colours, shapes, sizes,
  backgrounds, label words, "a", "on", "and" ...) is one token and anything else falls back to characters. The
  T5 tokenizer is a Unigram model with one ``"\u2581word"`` piece per world word plus character fallbacks.
- **text encoders**: two ``CLIPTextModelWithProjection`` (2 layers, width 32, projection 32; 36 positions) and a
  ``T5EncoderModel`` (2 layers, d_model 64). They are trained jointly with the transformer.
- **VAE**: its own ``AutoencoderKL`` (64px: channels 16/32/64, two 2x downsamples, 4 latent channels), trained
  first as an autoencoder (MSE + L1 with object pixels weighted 10x, on random 32 px crops, + a small KL term);
  ``scaling_factor``/``shift_factor`` are then set from the latent statistics so the diffusion latents are ~unit
  variance. 64x64 px images give 4x16x16 latents.
- **transformer**: ``SD3Transformer2DModel`` (64px: 5 joint blocks, 6 heads x 16, patch 2 -> 64 image tokens),
  trained with rectified flow exactly as ``FlowMatchEulerDiscreteScheduler`` samples it:
  ``x_t = (1 - t) x0 + t eps``, target ``eps - x0``, timestep input ``1000 t``, t ~ logit-normal(0, 1).
  The prompt (``make_prompt`` of a train-split scene, or ``make_layout_prompt`` of a layout scene for
  ``layout64``) is dropped to ``""`` 10% of the time, which is what the
  pipeline's CFG uses as the default negative prompt. Latents of the first 16384 train scenes are cached once
  the VAE is frozen; AdamW at 1e-3 with warm-up and a cosine decay over the time budget; EMA weights are saved.

Training is time-bounded and resumable: a checkpoint (with the EMA and the latent cache) is written to
``.zoo_ckpt/tiny-sd3/`` every ``--ckpt-every`` seconds; rerunning continues until the total budget ``--minutes``
is spent (``--fresh`` starts over; ``--export`` saves the checkpoint's pipeline without training). ``--init-from``
continues a saved model as a new *stage*: a fresh optimiser, whose warm-up and cosine decay start at the saved
step and minutes (``mmeff.zoo.train_common.stage_lr``). ``--device cuda --amp`` trains on a GPU under bf16
autocast (``mmeff.zoo.train_gpu`` runs it in one timed call, with ``--lr`` / ``--pool`` overrides); checkpoints
are device-free, so a GPU run's checkpoint resumes here. The final
pipeline goes to ``mmeff/zoo/models/tiny-sd3/`` via ``save_pretrained``, with ``training.json`` (recipe, seed,
steps, samples seen, minutes, losses, sizes, lineage, stage, runs). Load it with
:func:`mmeff.zoo.load_pipeline.load_pipeline` (``"tiny-sd3"``).
"""
from __future__ import annotations

import argparse
import json
import string
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

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

ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = Path(__file__).resolve().parent / "models"
OUT_DIR = MODELS_DIR / "tiny-sd3"
CKPT_DIR = ROOT / ".zoo_ckpt" / "tiny-sd3"
IMAGE_SIZE = 64  # the shipped (64px) recipe's image size; world_batch's default
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


def recipe_vocabulary(recipe: str = "64px") -> list[str]:
    """The words a recipe's prompts use: the world's, plus the layout words for ``data="layout"`` recipes."""
    from .world.layout import LAYOUT_WORDS

    words = world_vocabulary()
    if recipe_of(recipe).get("data") == "layout":
        words = list(dict.fromkeys(words + list(LAYOUT_WORDS)))
    return words


def clip_tokenizer(max_length: int = TEXT_LEN, words: list[str] | None = None) -> Any:
    """A CLIP BPE tokenizer whose merges make every world word (or every one of ``words``) a single token
    (built in memory)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    tk = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=4000, min_frequency=1, show_progress=False,
                                  special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  initial_alphabet=_CHARS, end_of_word_suffix="</w>")
    tk.train_from_iterator([" ".join(words or world_vocabulary())] * 2, trainer)
    model = json.loads(tk.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def t5_tokenizer(words: list[str] | None = None) -> Any:
    """A T5 (Unigram) tokenizer with one piece per world word (or per one of ``words``) and character
    fallbacks (built in memory)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -6.0) for c in _CHARS] + [("\u2581" + c, -6.0) for c in _CHARS]
    seen = {p for p, _ in vocab}
    vocab += [("\u2581" + w, -1.0) for w in (words or world_vocabulary()) if "\u2581" + w not in seen]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


# ---------------------------------------------------------------------------------------------- recipes
RECIPES: dict[str, dict[str, Any]] = {
    # the first shipped model: 32 px, one 2x VAE downsample, 4 blocks x 4 heads, on-the-fly data, no EMA
    "32px": {"image_size": 32, "vae_channels": (16, 32), "layers": 4, "heads": 4, "batch": 16, "lr": 3e-4,
             "warmup": 200, "cosine": False, "ema": 0.0, "pool": 0, "vae_l1": 0.0, "vae_lr": 1e-3, "vae_batch": None,
             "vae_crop": None, "vae_object_weight": 0.0, "t_loc": 0.0},
    # 64 px: the smallest size where a "small" object (radius 0.065 of the canvas) is ~8 px across, enough
    # pixels for a star, a cross and a diamond to differ (at 32 px it is 4 px: a blob). Two 2x VAE
    # downsamples keep the latent at 16x16 and, with patch 2, the transformer at 64 image tokens (one
    # token per 8x8 px, i.e. about one small object), so a step costs what the 32 px model's did.
    # Latents of the first ``pool`` train scenes are cached (the VAE is frozen after phase 0), so later
    # steps skip rendering and encoding; EMA weights are what is saved.
    # The VAE (convolutional, no attention) trains on random 32 px crops of the 64 px renders in batches of 16:
    # a quarter of the pixels per sample, so four times the steps in the same minutes. Its reconstruction loss
    # weights object pixels (those that differ from the background) 10x: objects cover a few percent of the
    # canvas, and a plain MSE learns the background first and turns purple into blue.
    "64px": {"image_size": 64, "vae_channels": (16, 32, 64), "layers": 5, "heads": 6, "batch": 32, "lr": 1e-3,
             "warmup": 300, "cosine": True, "ema": 0.9995, "pool": 16384, "vae_l1": 0.5, "vae_lr": 2e-3,
             "vae_batch": 16, "vae_crop": 32, "vae_object_weight": 9.0, "t_loc": 0.0},
    # layout: the 64px architecture on layout scenes (mmeff.zoo.world.layout), whose prompts name every
    # object's cell of a 3x3 grid and which carry no printed labels, so the prompt fixes the picture up to a
    # small jitter. With free-form prompts the 64px model averaged over the positions it had to invent and
    # drew blobs. The prompts add position words, so the tokenizers and text encoders are new; the VAE and
    # the transformer continue the 64px model's (--init-from).
    "layout64": {"image_size": 64, "vae_channels": (16, 32, 64), "layers": 5, "heads": 6, "batch": 32, "lr": 1e-3,
                 "warmup": 300, "cosine": True, "ema": 0.9995, "pool": 32768, "vae_l1": 0.5, "vae_lr": 2e-3,
                 "vae_batch": 16, "vae_crop": 32, "vae_object_weight": 9.0, "t_loc": 0.0, "data": "layout"},
}
DEFAULT_RECIPE = "64px"
"""The shipped model's recipe (``"32px"`` rebuilds the first tiny-sd3, kept in ``training.json`` lineage)."""


def recipe_of(name: str) -> dict[str, Any]:
    if name not in RECIPES:
        from ..core.errors import ConfigError

        raise ConfigError(f"unknown tiny-sd3 recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]


# ---------------------------------------------------------------------------------------------- components
def build_vae(seed: int = 0, recipe: str = DEFAULT_RECIPE) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    r = recipe_of(recipe)
    n = len(r["vae_channels"])
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(r["vae_channels"]),
                         layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=r["image_size"],
                         mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
                         scaling_factor=1.0, shift_factor=0.0)


def latent_size(recipe: str = DEFAULT_RECIPE) -> int:
    r = recipe_of(recipe)
    return r["image_size"] // 2 ** (len(r["vae_channels"]) - 1)


def build_pipeline(seed: int = 0, recipe: str = DEFAULT_RECIPE) -> Any:
    """A freshly initialised tiny SD3 pipeline of ``recipe`` (VAE untrained as well)."""
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

    r = recipe_of(recipe)
    words = recipe_vocabulary(recipe)
    tok, tok3 = clip_tokenizer(words=words), t5_tokenizer(words)
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
    lat = latent_size(recipe)
    transformer = SD3Transformer2DModel(sample_size=lat, patch_size=2, in_channels=4, num_layers=r["layers"],
                                        attention_head_dim=16, num_attention_heads=r["heads"], joint_attention_dim=64,
                                        caption_projection_dim=16 * r["heads"], pooled_projection_dim=64,
                                        out_channels=4, pos_embed_max_size=lat)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=build_vae(seed, recipe), text_encoder=encoders[0], tokenizer=tok,
                                    text_encoder_2=encoders[1], tokenizer_2=clip_tokenizer(words=words),
                                    text_encoder_3=t5, tokenizer_3=tok3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------- data
def scenes_and_prompts(seeds: list[int], data: str = "world") -> tuple[list[Any], list[str]]:
    """The scenes of ``seeds`` and their prompts: world scenes with ``make_prompt`` (``data="world"``) or
    layout scenes with ``make_layout_prompt`` (``"layout"``)."""
    from .world import generate_scene, make_prompt
    from .world.layout import generate_layout_scene, make_layout_prompt

    if data == "layout":
        scenes = [generate_layout_scene(s) for s in seeds]
        return scenes, [make_layout_prompt(sc) for sc in scenes]
    scenes = [generate_scene(s) for s in seeds]
    return scenes, [make_prompt(sc) for sc in scenes]


def world_images(seeds: list[int], size: int = IMAGE_SIZE, data: str = "world") -> tuple[np.ndarray, list[str]]:
    """Renders (``[B, size, size, 3]`` uint8) and prompts of the scenes ``seeds`` (see :func:`scenes_and_prompts`)."""
    from .world import render

    scenes, prompts = scenes_and_prompts(seeds, data)
    return np.stack([np.asarray(render(sc, size=size), dtype=np.uint8) for sc in scenes]), prompts


def to_unit(arr: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> float ``[B, 3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def world_batch(seeds: list[int], size: int = IMAGE_SIZE, data: str = "world") -> tuple[torch.Tensor, list[str]]:
    """Images in [-1, 1] ([B, 3, size, size]) and prompts of the scenes ``seeds`` (see :func:`world_images`)."""
    arr, prompts = world_images(seeds, size, data)
    return to_unit(arr), prompts


def train_seeds(step: int, batch: int, phase: int) -> list[int]:
    """Train-split scene seeds of one batch (phase 0: VAE, 1: diffusion; different orders)."""
    n = 1_000_000
    start = (step * batch * 7919 + phase * 499_979) % n
    return [(start + i) % n for i in range(batch)]


def pool_seeds(first: int, count: int) -> list[int]:
    """Train-split seeds ``first .. first + count`` of the latent pool's bulk fill (:func:`fill_pool`)."""
    return [(499_979 + i) % 1_000_000 for i in range(first, first + count)]


# ---------------------------------------------------------------------------------------------- helpers
def encode_text(pipe: Any, prompts: list[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's own prompt encoding (with gradients): ``(prompt_embeds, pooled_prompt_embeds)``."""
    pe, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                          do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN,
                                          device=torch.device(device))
    return pe, pooled


def text_modules(pipe: Any) -> list[torch.nn.Module]:
    return [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def load_saved(pipe: Any, folder: Path, recipe: str | None = None) -> dict[str, Any]:
    """Copy the weights of a saved tiny-sd3 pipeline into ``pipe`` (built by :func:`build_pipeline` with
    ``recipe``, by default the saved recipe) and return the training state its ``training.json`` records
    (counters, curves, latent statistics, earlier runs), so a continued run's data order and report carry on
    from it. The continuation is a new *stage*: its warm-up and cosine schedule start at the saved step and
    minutes. When ``recipe``'s prompts use other words than the saved recipe's (``64px`` -> ``layout64``), only
    the VAE and the transformer are copied: the tokenizers differ, so the text encoders start fresh, and the
    lineage records the parent."""
    from diffusers import StableDiffusion3Pipeline

    meta = read_training_json(folder, FORMAT, "train_sd3")
    parent_recipe = str(meta.get("recipe", "32px"))
    recipe = recipe or parent_recipe
    new_text = recipe_vocabulary(recipe) != recipe_vocabulary(parent_recipe)
    saved = StableDiffusion3Pipeline.from_pretrained(folder)
    kept = ("vae", "transformer") if new_text else ("vae", "transformer", "text_encoder", "text_encoder_2",
                                                    "text_encoder_3")
    for name in kept:
        getattr(pipe, name).load_state_dict(getattr(saved, name).state_dict())
    vae, diff = meta["vae"], meta["diffusion"]
    lineage = list(meta.get("lineage", []))
    if recipe != parent_recipe:
        lineage.append({"recipe": parent_recipe, "from": str(folder), "kept": list(kept),
                        "diffusion_steps": diff["steps"], "minutes": round(vae["minutes"] + diff["minutes"], 2),
                        "final_loss": diff.get("final_loss")})
    return {"phase": 1, "vae_step": vae["steps"], "vae_seconds": vae["minutes"] * 60, "vae_losses": vae["mse_curve"],
            "step": diff["steps"], "diff_seconds": diff["minutes"] * 60, "losses": diff["loss_curve"],
            "latent_shift": vae["shift_factor"], "latent_scale": vae["scaling_factor"],
            "lineage": lineage, "runs": list(meta.get("runs", [])),
            "samples_before": diff.get("samples_seen", diff["steps"] * meta.get("batch_size", 32)),
            "runs_counted_from": len(meta.get("runs", [])),
            "stage": {"step": diff["steps"], "seconds": diff["minutes"] * 60, "init_from": str(folder)}}


def saved_recipe(folder: Path) -> str:
    """The recipe a saved tiny-sd3 was trained with (models saved before recipes existed are ``"32px"``)."""
    meta = read_training_json(folder, FORMAT, "train_sd3")
    return str(meta.get("recipe", "32px"))


def fill_pool(pool: LatentPool, encode: Any, size: int, workers: int, chunk: int = 512, data: str = "world") -> None:
    """Render and encode the rest of ``pool`` in bulk (scenes :func:`pool_seeds`), ``workers`` processes
    rendering while ``encode`` (uint8 images -> scaled latents) runs on the training device."""
    from functools import partial

    seeds = pool_seeds(len(pool), pool.size - len(pool))
    t0 = time.time()
    for arr, prompts in render_chunks(partial(world_images, size=size, data=data), seeds, chunk, workers):
        pool.add(encode(arr), prompts)
    print(f"latent pool filled: {len(pool)} scenes in {time.time() - t0:.1f} s ({workers} render workers)",
          flush=True)


# ---------------------------------------------------------------------------------------------- training
def train(minutes: float, vae_minutes: float | None = None, batch: int | None = None, seed: int = 0,
          ckpt_every: float = 60.0, fresh: bool = False, out_dir: Path = OUT_DIR, ckpt_dir: Path = CKPT_DIR,
          threads: int | None = None, log_every: int = 50, init_from: Path | None = None,
          recipe: str | None = None, export_only: bool = False, *, device: str | None = "cpu", amp: bool = False,
          deadline: float | None = None, lr: float | None = None, pool_size: int | None = None,
          render_workers: int = 0, max_steps: int | None = None, t_loc: float | None = None) -> dict[str, Any]:
    """Train (or resume) tiny-sd3 until ``minutes`` in total are spent; ``init_from`` (a saved
    tiny-sd3 folder, e.g. the shipped one) continues that model instead of starting fresh, so
    training can go on across machines that keep no ``.zoo_ckpt``. ``export_only`` saves the
    checkpoint's (EMA) pipeline to ``out_dir`` without training (to evaluate a run in progress).

    ``device`` (``"cuda"``, ``"auto"``) trains there, ``amp`` under bf16 autocast; ``deadline`` (a
    ``time.time()``) stops early, checkpoints and exports, whatever budget is left; ``lr`` and ``pool_size``
    override the recipe's, as does ``t_loc`` (the location of the logit-normal timestep density; > 0 samples
    more noise); ``max_steps`` stops at that diffusion step (for equal-step comparisons); ``render_workers`` > 1
    fills the latent pool in bulk with that many render processes (for a GPU machine's idle cores).
    Checkpoints are device-free: a GPU run's resumes on the CPU."""
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    stop = Deadline(deadline)
    ckpt_path = ckpt_dir / "ckpt.pt"
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False) if ckpt_path.exists() and not fresh else None
    if recipe is None:
        recipe = (ck or {}).get("recipe") or (saved_recipe(Path(init_from)) if init_from else DEFAULT_RECIPE)
    r = dict(recipe_of(recipe))
    overrides = {k: v for k, v in (("lr", lr), ("pool", pool_size), ("t_loc", t_loc)) if v is not None}
    r.update(overrides)
    batch = batch or r["batch"]
    vae_minutes = min(4.0, 0.2 * minutes) if vae_minutes is None else vae_minutes
    torch.manual_seed(seed)
    pipe = build_pipeline(seed, recipe)
    vae, tr = pipe.vae, pipe.transformer
    learned = {"transformer": tr, "te1": pipe.text_encoder, "te2": pipe.text_encoder_2, "te3": pipe.text_encoder_3}
    st: dict[str, Any] = {"phase": 0, "vae_step": 0, "step": 0, "vae_seconds": 0.0, "diff_seconds": 0.0,
                          "vae_losses": [], "losses": [], "latent_shift": 0.0, "latent_scale": 1.0, "runs": [],
                          "stage": {"step": 0, "seconds": 0.0}}
    pool = LatentPool(r["pool"])
    pool_path = ckpt_dir / "latent_pool.pt"
    if ck is not None:
        for name, mod in [("vae", vae), ("transformer", tr), ("te1", pipe.text_encoder),
                          ("te2", pipe.text_encoder_2), ("te3", pipe.text_encoder_3)]:
            mod.load_state_dict(ck[name])
        st.update(ck["state"])
        st.setdefault("stage", {"step": 0, "seconds": 0.0})  # checkpoints from before stages: one stage from 0
        torch.set_rng_state(ck["rng"])
        pool.load(pool_path)
        print(f"resumed from {ckpt_path}: recipe {recipe}, phase {st['phase']}, vae_step {st['vae_step']}, "
              f"step {st['step']}, pool {len(pool)}", flush=True)
    elif init_from is not None:
        st.update(load_saved(pipe, Path(init_from), recipe))
        print(f"continuing {init_from}: diffusion step {st['step']}, "
              f"{(st['vae_seconds'] + st['diff_seconds']) / 60:.1f} of {minutes:.0f} min spent", flush=True)
    pipe.to(dev)
    diff_params = [p for m in learned.values() for p in m.parameters()]
    opt_vae = torch.optim.AdamW(vae.parameters(), lr=r["vae_lr"], weight_decay=0.0)
    opt = torch.optim.AdamW(diff_params, lr=r["lr"], weight_decay=0.01)
    if ck is not None:
        if ck.get("opt_vae"):  # GPU bundles drop it once the VAE is frozen
            opt_vae.load_state_dict(ck["opt_vae"])
        opt.load_state_dict(ck["opt"])
    ema = EMA(learned, r["ema"]) if r["ema"] > 0 else None
    if ema is not None and ck is not None and ck.get("ema"):
        ema.load(ck["ema"], dev)
    run_info = {"device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev), "amp": bool(amp),
                "batch": batch, "lr": r["lr"], "pool": r["pool"], "threads": torch.get_num_threads(),
                "from_step": st["step"], "to_step": st["step"], "minutes": 0.0}
    st["runs"] = list(st.get("runs", [])) + [run_info]
    t_run = time.time()

    def checkpoint() -> None:
        run_info.update(to_step=st["step"], minutes=round((time.time() - t_run) / 60, 2))
        save_ckpt(ckpt_path, {"recipe": recipe, "vae": vae.state_dict(), "transformer": tr.state_dict(),
                              "te1": pipe.text_encoder.state_dict(), "te2": pipe.text_encoder_2.state_dict(),
                              "te3": pipe.text_encoder_3.state_dict(), "opt_vae": opt_vae.state_dict(),
                              "opt": opt.state_dict(), "state": st, "rng": torch.get_rng_state(),
                              "ema": None if ema is None else ema.state()})
        pool.save(pool_path)

    def finish() -> dict[str, Any]:
        if ema is not None:
            ema.copy_to(learned)
        pipe.to("cpu")
        return save(pipe, st, seed=seed, batch=batch, minutes=minutes, out_dir=out_dir, recipe=recipe,
                    recipe_config=r)

    if export_only:
        if ck is None:
            raise FileNotFoundError(f"no checkpoint to export at {ckpt_path}")
        st["runs"].pop()  # exporting is no training run
        return finish()

    size, data = r["image_size"], r.get("data", "world")
    # ---- phase 0: the VAE as an autoencoder
    last_ck = time.time()
    if st["phase"] == 0:
        vae.train()
        run = []
        while st["vae_seconds"] < vae_minutes * 60 and not stop.passed():
            t0 = time.time()
            vb = r["vae_batch"] or batch
            x, _ = world_batch(train_seeds(st["vae_step"], vb, 0), size, data)
            x = x.to(dev)
            weight = 1.0 + r["vae_object_weight"] * object_mask(x)
            if r["vae_crop"]:
                xw = random_crops(torch.cat([x, weight], 1), r["vae_crop"], st["vae_step"])
                x, weight = xw[:, :3], xw[:, 3:]
            for g in opt_vae.param_groups:
                g["lr"] = stage_lr(r["vae_lr"], st["vae_step"], 0.0, 1.0, 100, False)
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
            mse = torch.nn.functional.mse_loss(rec, x)
            kl = post.kl().mean() / x[0].numel()
            err = rec - x
            loss = (weight * err ** 2).mean() + r["vae_l1"] * (weight * err.abs()).mean() + 1e-4 * kl
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
        # latent statistics -> scaling / shift (the pipeline decodes z / scale + shift)
        vae.eval()
        with torch.no_grad():
            x, _ = world_batch(list(range(500_000, 500_512)), size, data)
            z = vae.encode(x.to(dev)).latent_dist.mode()
        st["latent_shift"] = float(z.mean())
        st["latent_scale"] = float(1.0 / z.std())
        st["phase"] = 1
        checkpoint()
        last_ck = time.time()
    vae.eval().requires_grad_(False)
    shift, scale = st["latent_shift"], st["latent_scale"]

    @torch.no_grad()
    def encode_images(arr: np.ndarray) -> torch.Tensor:
        zs = [vae.encode(to_unit(arr[i:i + 256]).to(dev)).latent_dist.mode() for i in range(0, len(arr), 256)]
        return (torch.cat(zs) - shift) * scale

    # ---- phase 1: flow matching on the transformer + text encoders
    for m in learned.values():
        m.train()
    budget = max(0.0, minutes * 60 - st["vae_seconds"])
    if r["pool"] and not pool.full and render_workers > 1 and st["diff_seconds"] < budget:
        try:
            fill_pool(pool, encode_images, size, render_workers, data=data)
        except Exception as e:  # noqa: BLE001 - a one-shot GPU call goes on growing the pool step by step instead
            print(f"bulk pool fill failed ({type(e).__name__}: {e}); growing it per step", flush=True)
    run = []
    gen = torch.Generator().manual_seed(seed * 1000 + st["step"])
    while st["diff_seconds"] < budget and not stop.passed() and (max_steps is None or st["step"] < max_steps):
        t0 = time.time()
        if r["pool"] and pool.full:
            x0, prompts = pool.sample(batch, gen)
        else:
            x, prompts = world_batch(train_seeds(st["step"], batch, 1), size, data)
            with torch.no_grad():
                post = vae.encode(x.to(dev)).latent_dist
                x0 = ((post.mode() if r["pool"] else post.sample(generator=gen)) - shift) * scale
            if r["pool"]:
                pool.add(x0, prompts)
        drop = torch.rand(batch, generator=gen) < 0.1
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        eps = torch.randn(x0.shape, generator=gen).to(dev)
        t = torch.sigmoid(torch.randn(batch, generator=gen) + r.get("t_loc", 0.0)).to(dev)
        x0 = x0.to(dev)
        tt = t.view(-1, 1, 1, 1)
        xt = (1 - tt) * x0 + tt * eps
        for g in opt.param_groups:
            g["lr"] = stage_lr(r["lr"], st["step"], st["diff_seconds"], budget, r["warmup"], r["cosine"], st["stage"])
        with autocast(dev, amp):
            pe, pooled = encode_text(pipe, prompts, dev)
            pred = tr(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=pe, pooled_projections=pooled,
                      return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diff_params, 1.0)
        opt.step()
        if ema is not None:
            ema.update(learned, st["step"])
        run.append(loss.detach())
        st["step"] += 1
        st["diff_seconds"] += time.time() - t0
        if st["step"] % log_every == 0:
            mean = float(torch.stack(run).mean())
            st["losses"].append([st["step"], mean])
            print(f"step {st['step']} loss {mean:.4f} pool {len(pool)} "
                  f"({(st['vae_seconds'] + st['diff_seconds']) / 60:.1f} min)", flush=True)
            run = []
        if time.time() - last_ck > ckpt_every:
            checkpoint()
            last_ck = time.time()
    checkpoint()
    return finish()


def save(pipe: Any, st: dict[str, Any], *, seed: int, batch: int, minutes: float, out_dir: Path,
         recipe: str = DEFAULT_RECIPE, recipe_config: dict[str, Any] | None = None) -> dict[str, Any]:
    import diffusers
    import transformers

    r = recipe_config or recipe_of(recipe)
    pipe.vae.register_to_config(scaling_factor=st["latent_scale"], shift_factor=st["latent_shift"])
    for m in [pipe.vae, pipe.transformer, *text_modules(pipe)]:
        m.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir)
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file() and f.name != "training.json")
    lat = latent_size(recipe)
    info = {
        "format": FORMAT, "trained": st["step"] > 0, "recipe": recipe, "prompt_family": r.get("data", "world"),
        "recipe_config": {k: list(v) if isinstance(v, tuple) else v for k, v in r.items()}, "seed": seed,
        "batch_size": batch, "budget_minutes": minutes, "image_size": r["image_size"], "latent_shape": [4, lat, lat],
        "vae": {"steps": st["vae_step"], "samples_seen": st["vae_step"] * (r["vae_batch"] or batch),
                "minutes": round(st["vae_seconds"] / 60, 2), "mse_curve": st["vae_losses"],
                "scaling_factor": st["latent_scale"], "shift_factor": st["latent_shift"],
                "params": n_params(pipe.vae)},
        "diffusion": {"steps": st["step"], "samples_seen": samples_seen(st, batch),
                      "minutes": round(st["diff_seconds"] / 60, 2), "loss_curve": st["losses"],
                      "final_loss": st["losses"][-1][1] if st["losses"] else None,
                      "objective": "rectified flow: x_t=(1-t)x0+t*eps, target eps-x0, t~logit-normal, "
                                   "timestep=1000t, text dropout 10% (prompt -> '')",
                      "weights": f"EMA (decay {r['ema']})" if r["ema"] else "last step"},
        "params": {"transformer": n_params(pipe.transformer), "text_encoder": n_params(pipe.text_encoder),
                   "text_encoder_2": n_params(pipe.text_encoder_2), "text_encoder_3": n_params(pipe.text_encoder_3),
                   "vae": n_params(pipe.vae)},
        "disk_bytes": size, "lineage": st.get("lineage", []), "stage": st.get("stage"), "runs": st.get("runs", []),
        "data": (f"layout scenes of the world's train split, make_layout_prompt(scene), render(scene, size={r['image_size']})"
                 if r.get("data") == "layout" else
                 f"shapes world train split, make_prompt(scene), render(scene, size={r['image_size']})"),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
    }
    (out_dir / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"saved {out_dir} ({size / 1e6:.1f} MB); diffusion steps {st['step']}, final loss {info['diffusion']['final_loss']}",
          flush=True)
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="total training budget (VAE + diffusion)")
    ap.add_argument("--vae-minutes", type=float, default=None, help="VAE phase budget (default min(4, 0.2 x minutes))")
    ap.add_argument("--batch", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                    help="architecture + schedule (default: the checkpoint's, the --init-from model's, or 64px)")
    ap.add_argument("--lr", type=float, default=None, help="override the recipe's learning rate")
    ap.add_argument("--pool", type=int, default=None, help="override the recipe's latent-pool size (scenes)")
    ap.add_argument("--t-loc", type=float, default=None, help="override the logit-normal timestep location (0)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop at this diffusion step (equal-step comparisons)")
    ap.add_argument("--export", action="store_true",
                    help="save the checkpoint's pipeline (EMA weights) to --out without training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=float, default=60.0, help="seconds between checkpoints")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on shared CPUs)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast for the transformer and text encoders (CUDA)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--ckpt-dir", type=Path, default=CKPT_DIR)
    ap.add_argument("--init-from", type=Path, default=None,
                    help="continue a saved tiny-sd3 (e.g. mmeff/zoo/models/tiny-sd3) when no checkpoint exists; "
                         "--minutes stays the total budget, so it trains for the minutes not yet spent")
    a = ap.parse_args(argv)
    train(a.minutes, a.vae_minutes, a.batch, a.seed, a.ckpt_every, a.fresh, a.out, a.ckpt_dir, a.threads, a.log_every,
          init_from=a.init_from, recipe=a.recipe, export_only=a.export, device=a.device, amp=a.amp, lr=a.lr,
          pool_size=a.pool, max_steps=a.max_steps, t_loc=a.t_loc)


if __name__ == "__main__":
    main()
