"""Train mmeff's tiny zoo VLMs from scratch on the shapes world (CPU, time-bounded, resumable).

Usage::

    python -m mmeff.zoo.train_vlm --model tiny-llava --minutes 30
    python -m mmeff.zoo.train_vlm --model tiny-qwen2-vl --minutes 20
    python -m mmeff.zoo.train_vlm --model tiny-llava --init-only   # untrained placeholder

Data: scenes of the *train* split (seeds drawn at random from its range), rendered at
336 px on the fly. One training sequence = one image followed by all questions of that
scene as a multi-turn chat (existence incl. POPE negatives, colour, size, count, position,
reading, caption with the canonical caption as answer), turns shuffled; the loss covers
the answer tokens (and the closing ``<|end|>``) only. The first turn is exactly the
single-question chat format used at inference.

Optimiser: AdamW, linear warmup then cosine decay over the *time* budget (so a resumed run
continues the same schedule). Checkpoints (model + optimiser + counters) go to
``.zoo_ckpt/<name>/ckpt.pt`` every ``--ckpt-minutes``; a rerun resumes from there. At the
end the model and processor are written with ``save_pretrained`` to ``--out`` (default
``mmeff/zoo/models/<name>/``) together with ``training.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .load import MODELS_DIR, ZOO_MODELS
from .processors import (
    BOS,
    EOS,
    IMAGE_SIZE,
    LLAVA_IMAGE,
    PATCH_SIZE,
    QWEN_MERGE,
    build_processor,
)
from .world import SPLITS, generate_scene, make_questions, render

REPO_ROOT = Path(__file__).resolve().parents[2]
CKPT_ROOT = REPO_ROOT / ".zoo_ckpt"

# --------------------------------------------------------------------------- models

SIZES: dict[str, dict[str, int]] = {
    # vision tower / LM sizes; kept small so CPU training converges in ~25 minutes
    # LLaVA pushes all 576 visual tokens through the LM, so its LM is narrower than Qwen's (144 tokens).
    "tiny-llava": dict(v_hidden=64, v_layers=3, v_heads=4, hidden=128, layers=4, heads=4, kv_heads=2),
    "tiny-qwen2-vl": dict(v_hidden=96, v_layers=3, v_heads=4, hidden=192, layers=4, heads=4, kv_heads=2),
}


def _vocab_size(tokenizer: Any) -> int:
    return int(math.ceil(len(tokenizer) / 64) * 64)


def build_model(name: str, processor: Any, seed: int = 0, **overrides: int) -> Any:
    """A randomly initialised zoo model ``name`` matching ``processor``'s tokenizer."""
    tok = processor.tokenizer
    s = {**SIZES[name], **overrides}
    text = dict(
        vocab_size=_vocab_size(tok),
        hidden_size=s["hidden"],
        intermediate_size=2 * s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if name == "tiny-llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

        vision = CLIPVisionConfig(
            hidden_size=s["v_hidden"],
            intermediate_size=2 * s["v_hidden"],
            num_hidden_layers=s["v_layers"],
            num_attention_heads=s["v_heads"],
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            projection_dim=s["v_hidden"],
        )
        cfg = LlavaConfig(
            vision_config=vision,
            text_config=LlamaConfig(**text),
            image_token_index=tok.convert_tokens_to_ids(LLAVA_IMAGE),
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        )
        model = LlavaForConditionalGeneration(cfg)
    elif name == "tiny-qwen2-vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        head_dim = s["hidden"] // s["heads"]
        q = head_dim // 2
        mrope = [q - 2 * (3 * q // 8), 3 * q // 8, 3 * q // 8]
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope}
        vision = dict(
            depth=s["v_layers"],
            embed_dim=s["v_hidden"],
            hidden_size=s["hidden"],
            num_heads=s["v_heads"],
            patch_size=PATCH_SIZE,
            spatial_merge_size=QWEN_MERGE,
            temporal_patch_size=2,
            mlp_ratio=2,
            in_channels=3,
        )
        cfg = Qwen2VLConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        )
        model = Qwen2VLForConditionalGeneration(cfg)
    else:
        raise ValueError(f"unknown zoo model {name!r}; choose from {sorted(ZOO_MODELS)}")
    gc = model.generation_config
    gc.eos_token_id = tok.eos_token_id
    gc.pad_token_id = tok.pad_token_id
    gc.bos_token_id = tok.bos_token_id
    gc.do_sample = False
    gc.max_new_tokens = 48
    return model


# --------------------------------------------------------------------------- data


class Batcher:
    """Builds training batches (token ids, labels, pixel inputs) straight from scenes."""

    def __init__(self, name: str, processor: Any):
        self.name = name
        self.proc = processor
        self.tok = processor.tokenizer
        self.qwen = name == "tiny-qwen2-vl"
        t = self.tok
        self.id = {k: t.convert_tokens_to_ids(k) for k in (BOS, EOS, "<|user|>", "<|assistant|>")}
        if self.qwen:
            self.image_ids = (
                [t.convert_tokens_to_ids("<|vision_start|>")]
                + [t.convert_tokens_to_ids("<|image_pad|>")] * (IMAGE_SIZE // PATCH_SIZE // QWEN_MERGE) ** 2
                + [t.convert_tokens_to_ids("<|vision_end|>")]
            )
            self.image_token_id = t.convert_tokens_to_ids("<|image_pad|>")
        else:
            self.image_ids = [t.convert_tokens_to_ids(LLAVA_IMAGE)] * (IMAGE_SIZE // PATCH_SIZE) ** 2
            self.image_token_id = self.image_ids[0]
        self._cache: dict[str, list[int]] = {}

    def _enc(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tok(text, add_special_tokens=False).input_ids
            if len(self._cache) < 200_000:
                self._cache[text] = ids
        return ids

    def sequence(self, seed: int, rng: random.Random) -> tuple[list[int], list[int]]:
        scene = generate_scene(seed)
        qas = make_questions(scene, rng, per_family=3)
        rng.shuffle(qas)
        ids = [self.id[BOS]]
        labels = [-100]
        for k, qa in enumerate(qas):
            user = [self.id["<|user|>"]] + (self.image_ids if k == 0 else []) + self._enc(qa.question)
            user += [self.id[EOS], self.id["<|assistant|>"]]
            ans = self._enc(qa.answer) + [self.id[EOS]]
            ids += user + ans
            labels += [-100] * len(user) + ans
        return ids, labels

    def batch(self, seeds: list[int], rng: random.Random) -> dict[str, torch.Tensor]:
        seqs = [self.sequence(s, rng) for s in seeds]
        images = [render(generate_scene(s)) for s in seeds]
        n = max(len(i) for i, _ in seqs)
        pad = self.tok.pad_token_id
        input_ids = torch.full((len(seqs), n), pad, dtype=torch.long)
        labels = torch.full((len(seqs), n), -100, dtype=torch.long)
        attn = torch.zeros((len(seqs), n), dtype=torch.long)
        for b, (i, l) in enumerate(seqs):
            input_ids[b, : len(i)] = torch.tensor(i)
            labels[b, : len(l)] = torch.tensor(l)
            attn[b, : len(i)] = 1
        out: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attn, "labels": labels}
        pix = self.proc.image_processor(images=images, return_tensors="pt")
        out["pixel_values"] = pix["pixel_values"]
        if self.qwen:
            out["image_grid_thw"] = pix["image_grid_thw"]
            out["mm_token_type_ids"] = (input_ids == self.image_token_id).long()
        return out


# --------------------------------------------------------------------------- training


def _lr(progress: float, base: float, warmup: float = 0.03, floor: float = 0.05) -> float:
    if progress < warmup:
        return base * max(progress / warmup, 0.02)
    p = min(1.0, (progress - warmup) / (1 - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def model_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def save_final(model: Any, processor: Any, out: Path, info: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("*.safetensors"):
        f.unlink()
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    info["model_size_mb"] = round(model_size_mb(out), 2)
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


def init_only(name: str, out: Path, seed: int = 0) -> None:
    processor = build_processor(ZOO_MODELS[name])
    model = build_model(name, processor, seed=seed)
    info = {
        "trained": False,
        "model": name,
        "note": f"untrained placeholder; build the real one with `python -m mmeff.zoo.train_vlm --model {name}`",
        "seed": seed,
        "params": sum(p.numel() for p in model.parameters()),
        "config": SIZES[name],
    }
    save_final(model, processor, out, info)
    print(f"saved untrained {name} to {out} ({info['model_size_mb']} MB)")


def train(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    name = args.model
    out = Path(args.out) if args.out else MODELS_DIR / name
    ckpt_dir = CKPT_ROOT / name
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = ckpt_dir / "ckpt.pt"
    processor = build_processor(ZOO_MODELS[name])
    model = build_model(name, processor, seed=args.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    state = {"step": 0, "samples": 0, "elapsed": 0.0, "loss_ema": None, "history": []}
    budget = args.minutes * 60.0
    if ckpt_path.is_file() and not args.fresh:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        state = ck["state"]
        budget = ck.get("budget", budget) if not args.new_budget else budget
        print(f"resumed {name} from {ckpt_path}: step {state['step']}, {state['samples']} samples, "
              f"{state['elapsed'] / 60:.1f} of {budget / 60:.1f} min", flush=True)
    batcher = Batcher(name, processor)
    lo, hi = SPLITS["train"]

    def save_ckpt() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state, "budget": budget,
                    "args": vars(args)}, tmp)
        os.replace(tmp, ckpt_path)

    params = sum(p.numel() for p in model.parameters())
    print(f"training {name}: {params / 1e6:.2f} M params, batch {args.batch}, lr {args.lr}, "
          f"budget {budget / 60:.1f} min", flush=True)
    t_start = time.time() - state["elapsed"]
    last_ckpt = time.time()
    last_log = time.time()
    log_samples = 0
    log_t = time.time()
    while True:
        elapsed = time.time() - t_start
        if elapsed >= budget:
            break
        rng = random.Random(f"train-{args.seed}-{state['step']}")
        seeds = [rng.randrange(lo, hi) for _ in range(args.batch)]
        batch = batcher.batch(seeds, rng)
        lr = _lr(elapsed / budget, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model(**batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        state["step"] += 1
        state["samples"] += len(seeds)
        log_samples += len(seeds)
        lv = float(loss.detach())
        state["loss_ema"] = lv if state["loss_ema"] is None else 0.95 * state["loss_ema"] + 0.05 * lv
        state["elapsed"] = time.time() - t_start
        now = time.time()
        if now - last_log >= args.log_seconds:
            sps = log_samples / (now - log_t)
            state["history"].append({"step": state["step"], "samples": state["samples"],
                                     "minutes": round(state["elapsed"] / 60, 2), "loss": round(state["loss_ema"], 4)})
            print(f"[{name}] step {state['step']} samples {state['samples']} "
                  f"{state['elapsed'] / 60:5.1f}/{budget / 60:.0f} min loss {lv:.3f} (ema {state['loss_ema']:.3f}) "
                  f"lr {lr:.2e} {sps:.2f} samples/s", flush=True)
            last_log, log_t, log_samples = now, now, 0
        if now - last_ckpt >= args.ckpt_minutes * 60:
            save_ckpt()
            last_ckpt = now
    save_ckpt()
    wall = state["elapsed"]
    info = {
        "trained": True,
        "model": name,
        "seed": args.seed,
        "samples_seen": state["samples"],
        "data": "shapes-world train split, one multi-turn chat of all questions per scene",
        "steps": state["step"],
        "batch_size": args.batch,
        "lr": args.lr,
        "wall_minutes": round(wall / 60, 2),
        "samples_per_s": round(state["samples"] / max(wall, 1e-9), 3),
        "final_loss_ema": round(state["loss_ema"], 4) if state["loss_ema"] is not None else None,
        "machine": f"{platform.machine()} {platform.processor() or ''} CPU, {args.threads} threads, "
                   f"torch {torch.__version__}".strip(),
        "params": params,
        "config": {**SIZES[name]},
        "history": state["history"],
    }
    save_final(model, processor, out, info)
    print(json.dumps({k: v for k, v in info.items() if k != "history"}, indent=2))
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m mmeff.zoo.train_vlm")
    p.add_argument("--model", required=True, choices=sorted(ZOO_MODELS))
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--out", default=None, help="output folder (default mmeff/zoo/models/<name>)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--log-seconds", type=float, default=30.0)
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--new-budget", action="store_true", help="on resume, use --minutes as the new total")
    p.add_argument("--init-only", action="store_true", help="save an untrained model + processor and exit")
    args = p.parse_args(argv)
    if args.init_only:
        init_only(args.model, Path(args.out) if args.out else MODELS_DIR / args.model, args.seed)
        return 0
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
