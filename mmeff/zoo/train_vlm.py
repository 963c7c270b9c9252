"""Train mmeff's tiny zoo VLMs from scratch on the shapes world (CPU, time-bounded, resumable).

Usage::

    python -m mmeff.zoo.train_vlm --model tiny-llava --minutes 30
    python -m mmeff.zoo.train_vlm --model tiny-qwen2-vl --minutes 20
    python -m mmeff.zoo.train_vlm --model tiny-llava --init-only   # untrained placeholder

Data: scenes of the *train* split (seeds drawn at random from its range), rendered at
336 px on the fly. One training sequence = one image followed by all questions of that
scene (existence incl. POPE negatives, colour, size, count, position, reading, caption with
the canonical caption as answer), in random order; the loss covers the answer tokens (and
the closing ``<|end|>``) only. The questions are packed as isolated turns
(:mod:`mmeff.zoo.isolated_turns`): each sees the image and itself only, at the positions of
the single-question chat used at inference, so no answer can be copied from another turn
(an ordinary multi-turn chat taught the models to answer existence from earlier mentions).
``--drill`` adds every shape's existence and count question to each scene (and
``--position-drill N`` up to N position questions): the shipped tiny-qwen2-vl went from chance
to 0.99 on existence with it. ``--init-from`` continues a saved model (e.g. the shipped one);
``--lm-from`` starts only the language model from another zoo model's (:mod:`mmeff.zoo.lm_transplant`;
tiny-llava's LM comes from tiny-qwen2-vl's).

Relative position (training-only heads, never saved): ``--lm-position-weight`` reads every image
token's grid position from one LM layer (:mod:`mmeff.zoo.lm_position_aux`); ``--pointer-weight``
makes one head attend to the object each position question names, ``--referent-weight`` reads
that object's centre at the phrase's last token, and ``--compare-weight`` reads x_A - x_B,
y_A - y_B at the final token (:mod:`mmeff.zoo.referent_position_aux`). Together they took
tiny-qwen2-vl's position answers from 0.52 to 0.97.

Vision supervision (:mod:`mmeff.zoo.vision_aux`): the answer loss alone is too weak a
signal to teach a from-scratch ViT the world through a 576-token image in CPU-minutes (the
first zoo models stayed at chance after 5k scenes, with the loss identical for true and
shuffled images). So the run starts with ``--vision-minutes`` of vision-only steps in which
the features handed to the LM must name, per patch, the shape/colour/size/word under it
(prototypes = the LM's own word embeddings) and its object's centre; the joint steps keep
that loss at ``--aux-weight``. Every ``--probe-minutes`` the log shows the validation answer
loss with true vs shuffled images: the gap is how much the model looks at the image.

Optimiser: AdamW, linear warmup then cosine decay over the *time* budget (so a resumed run
continues the same schedule). Checkpoints (model + optimiser + counters) go to
``.zoo_ckpt/<name>/ckpt.pt`` every ``--ckpt-minutes``; a rerun resumes from there. At the
end the model and processor are written with ``save_pretrained`` to ``--out`` (default
``mmeff/zoo/models/<name>/``) together with ``training.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
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

from .fixed_offset_attention import FixedOffsetMode
from .isolated_turns import isolate_turns
from .lm_position_aux import LMPositionAux
from .lm_transplant import donor_text_config, transplant_lm
from .load import MODELS_DIR, ZOO_MODELS
from .local_attention_init import (
    freeze_local_attention,
    init_local_attention,
    position_rows,
    qwen_vision_rope_theta,
)
from .processors import (
    BOS,
    EOS,
    IMAGE_SIZE,
    LLAVA_IMAGE,
    PATCH_SIZE,
    QWEN_MERGE,
    build_processor,
)
from .referent_position_aux import (
    PhraseGatherAux,
    ReferentAttentionAux,
    ReferentPositionAux,
    referent_token_ends,
)
from .token_drop import PATTERNS, TokenDrop, TokenDropConfig, draw_plan
from .vision_aux import (
    FeatureCapture,
    VisionAuxHead,
    class_token_ids,
    image_features_only,
    stack_labels,
)
from .world import SPLITS, generate_scene, grounding_drill, make_questions, render
from .world.labels import patch_labels
from .world.questions import refer

REPO_ROOT = Path(__file__).resolve().parents[2]
CKPT_ROOT = REPO_ROOT / ".zoo_ckpt"

# --------------------------------------------------------------------------- models

SIZES: dict[str, dict[str, Any]] = {
    # Vision tower / LM sizes, kept small enough for CPU training. The LMs are deep enough
    # that in-LLM pruners can meet the papers' average budgets 192/128/64: with 576 visual
    # tokens and L layers, pruning after layer K needs L * budget >= K * 576, so tiny-llava
    # (12 layers) takes K=1 at 64 and K=2 from 96; tiny-qwen2-vl (144 tokens, 8 layers)
    # takes K=2 at all three. LLaVA pushes 576 tokens through its LM, so it is narrower.
    # RoPE base 1e6 (as in Qwen2/Llama-3): with 16/32-dim heads and base 1e4 only one or two
    # frequency pairs rotate slowly enough for a question token to find an image token by
    # content hundreds of positions back. Switching both runs from 1e4 to 1e6 mid-training
    # opened the true-vs-shuffled image loss gap at once (tiny-llava 0.13 -> 0.29 in 11 min).
    # tiny-llava: 128-wide LM since 2026-11-23, started from tiny-qwen2-vl's LM (mmeff.zoo.lm_transplant, hence
    # the q/k/v(/o) biases and RMSNorm eps of Qwen2); every 64-wide LM trained from scratch stayed near chance.
    "tiny-llava": dict(v_hidden=64, v_layers=3, v_heads=4, hidden=128, layers=12, heads=4, kv_heads=2,
                       rope_theta=1_000_000, attention_bias=True, rms_norm_eps=1e-5),
    # tiny-qwen2-vl: base 50 since stage 4. M-RoPE gives the column axis the lowest frequencies; at 1e6 they
    # turn < 0.002 rad across its 12-column grid and the LM could not tell columns apart (docs/STATUS.md).
    "tiny-qwen2-vl": dict(v_hidden=96, v_layers=3, v_heads=4, hidden=128, layers=8, heads=4, kv_heads=2,
                          rope_theta=50),
}


def _vocab_size(tokenizer: Any) -> int:
    return int(math.ceil(len(tokenizer) / 64) * 64)


def build_model(name: str, processor: Any, seed: int = 0, local_init: bool = True, dominant: float | None = None,
                **overrides: Any) -> Any:
    """A randomly initialised zoo model ``name`` matching ``processor``'s tokenizer; with
    ``local_init`` its vision tower's heads start as fixed-offset (convolution-like) attention
    (:mod:`mmeff.zoo.local_attention_init`; ``dominant``: position-dominant LayerNorms, CLIP only)."""
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
        rope_parameters={"rope_type": "default", "rope_theta": float(s.get("rope_theta", 10_000))},
    )
    for key in ("attention_bias", "rms_norm_eps"):  # set by an LM transplant (mmeff.zoo.lm_transplant)
        if key in s:
            text[key] = s[key]
    torch.manual_seed(seed)
    if name == "tiny-llava":
        from transformers import (
            CLIPVisionConfig,
            LlamaConfig,
            LlavaConfig,
            LlavaForConditionalGeneration,
        )

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
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": mrope}
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
            rope_parameters={"rope_type": "axial",
                             "rope_theta": qwen_vision_rope_theta(s["v_hidden"] // s["v_heads"])},
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
    if local_init:
        init_local_attention(model, dominant=dominant)
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

    def __init__(self, name: str, processor: Any, drill: bool = False, position_drill: int = 0):
        self.name = name
        self.drill = drill
        self.position_drill = position_drill
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
        self.grid = IMAGE_SIZE // PATCH_SIZE // (QWEN_MERGE if self.qwen else 1)
        self._cache: dict[str, list[int]] = {}

    def _enc(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tok(text, add_special_tokens=False).input_ids
            if len(self._cache) < 200_000:
                self._cache[text] = ids
        return ids

    def sequence(self, seed: int, rng: random.Random) -> tuple[list[int], list[int], list[int]]:
        """Token ids, labels and segment ids of one scene: the prefix (BOS, ``<|user|>``, image)
        then one segment per question (question, EOS, ``<|assistant|>``, answer, EOS). With
        :func:`mmeff.zoo.isolated_turns.isolate_turns` each segment sees only the prefix and
        itself, i.e. exactly the single-question chat used at inference."""
        return self.sequence_with_referents(seed, rng)[:3]

    def sequence_with_referents(
        self, seed: int, rng: random.Random
    ) -> tuple[list[int], list[int], list[int], list[tuple[int, float, float, float]]]:
        """:meth:`sequence` plus three tuples per position question: (token index, x, y, radius) at
        the last token of object A's and of object B's phrase (the object's centre and half-extent),
        then (final ``<|assistant|>`` token, x_A - x_B, y_A - y_B, 0)
        (:mod:`mmeff.zoo.referent_position_aux`)."""
        scene = generate_scene(seed)
        qas = make_questions(scene, rng, per_family=3)
        if self.drill:  # every shape's existence and count, once each
            asked = {qa.question for qa in qas}
            extra = grounding_drill(scene, rng, positions=self.position_drill)
            qas += [qa for qa in extra if qa.question not in asked]
        rng.shuffle(qas)
        ids = [self.id[BOS], self.id["<|user|>"]] + self.image_ids
        labels = [-100] * len(ids)
        segments = [0] * len(ids)
        referents: list[tuple[int, float, float, float]] = []
        for k, qa in enumerate(qas, start=1):
            question = self._enc(qa.question) + [self.id[EOS], self.id["<|assistant|>"]]
            if qa.family == "position":
                referents += self._referents(scene, qa, offset=len(ids), final=len(ids) + len(question) - 1)
            ans = self._enc(qa.answer) + [self.id[EOS]]
            ids += question + ans
            labels += [-100] * len(question) + ans
            segments += [k] * (len(question) + len(ans))
        return ids, labels, segments, referents

    def _referents(self, scene: Any, qa: Any, offset: int, final: int) -> list[tuple[int, float, float, float]]:
        """(token index, x, y, radius) at the last token of both object phrases of position question ``qa``
        (word-level tokenizer: a prefix cut at a word end encodes to a prefix of the tokens), then
        (index of the final ``<|assistant|>`` token, x_A - x_B, y_A - y_B, 0) for the comparison."""
        out = []
        a, b = scene.objects[qa.meta["a"]], scene.objects[qa.meta["b"]]
        ends = referent_token_ends(qa.question, refer(scene, qa.meta["a"])[0], refer(scene, qa.meta["b"])[0])
        for end, obj in zip(ends, (a, b)):
            out.append((offset + len(self._enc(qa.question[:end])) - 1, obj.x, obj.y, obj.radius))
        out.append((final, a.x - b.x, a.y - b.y, 0.0))
        return out

    def images(self, seeds: list[int]) -> dict[str, torch.Tensor]:
        """Pixel inputs plus per-token auxiliary targets (``aux_*`` keys) for ``seeds``."""
        scenes = [generate_scene(s) for s in seeds]
        pix = self.proc.image_processor(images=[render(sc) for sc in scenes], return_tensors="pt")
        out = {"pixel_values": pix["pixel_values"]}
        if self.qwen:
            out["image_grid_thw"] = pix["image_grid_thw"]
        targets = stack_labels([patch_labels(sc, self.grid) for sc in scenes])
        out.update({f"aux_{k}": v for k, v in targets.items()})
        return out

    def batch(self, seeds: list[int], rng: random.Random) -> dict[str, torch.Tensor]:
        """Padded token ids, labels, flat attention mask and ``segment_ids`` (-1 on padding)
        plus the image inputs; :func:`isolate_turns` turns the segments into the model's
        4-D mask and position ids."""
        seqs = [self.sequence_with_referents(s, rng) for s in seeds]
        n = max(len(i) for i, _, _, _ in seqs)
        pad = self.tok.pad_token_id
        input_ids = torch.full((len(seqs), n), pad, dtype=torch.long)
        labels = torch.full((len(seqs), n), -100, dtype=torch.long)
        attn = torch.zeros((len(seqs), n), dtype=torch.long)
        segment_ids = torch.full((len(seqs), n), -1, dtype=torch.long)
        ref_index, ref_target, ref_radius, cmp_index, cmp_target = [], [], [], [], []
        for b, (i, l, g, r) in enumerate(seqs):
            input_ids[b, : len(i)] = torch.tensor(i)
            labels[b, : len(l)] = torch.tensor(l)
            attn[b, : len(i)] = 1
            segment_ids[b, : len(g)] = torch.tensor(g)
            objects, finals = [x for k, x in enumerate(r) if k % 3 < 2], r[2::3]
            ref_index += [(b, t) for t, _, _, _ in objects]
            ref_target += [(x, y) for _, x, y, _ in objects]
            ref_radius += [radius for _, _, _, radius in objects]
            cmp_index += [(b, t) for t, _, _, _ in finals]
            cmp_target += [(dx, dy) for _, dx, dy, _ in finals]
        out: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attn, "labels": labels,
                                        "segment_ids": segment_ids}
        out["aux_referent_index"] = torch.tensor(ref_index, dtype=torch.long).reshape(-1, 2)
        out["aux_referent_xy"] = torch.tensor(ref_target, dtype=torch.float32).reshape(-1, 2)
        out["aux_referent_radius"] = torch.tensor(ref_radius, dtype=torch.float32)
        out["aux_compare_index"] = torch.tensor(cmp_index, dtype=torch.long).reshape(-1, 2)
        out["aux_compare_dxy"] = torch.tensor(cmp_target, dtype=torch.float32).reshape(-1, 2)
        out.update(self.images(seeds))
        if self.qwen:
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


def saved_rope_theta(folder: str | Path) -> float | None:
    """The LM RoPE base a saved zoo model was trained with (so ``--init-from`` keeps it), or None."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    theta = ((cfg.get("text_config") or cfg).get("rope_parameters") or {}).get("rope_theta")
    return float(theta) if theta else None


def load_weights(model: Any, folder: Path) -> dict[str, Any]:
    """Start from the weights saved in ``folder`` (a zoo model folder of the same size) and
    return its ``training.json`` (empty if absent), e.g. to continue a shipped model with a new
    data recipe. The auxiliary head and the optimiser start fresh."""
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"no *.safetensors in {folder}; pass a folder written by save_pretrained")
    saved = type(model).from_pretrained(folder).state_dict()  # applies the class's key renaming
    missing, unexpected = model.load_state_dict(saved, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder} does not match the model built from SIZES: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    meta = folder / "training.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}


def _load_donor(folder: str | Path) -> Any:
    """The saved zoo model in ``folder`` of whichever class its config names."""
    import transformers

    cfg = json.loads((Path(folder) / "config.json").read_text())
    return getattr(transformers, cfg["architectures"][0]).from_pretrained(folder)


def _split_aux(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    inputs = {k: v for k, v in batch.items() if not k.startswith("aux_")}
    targets = {k[4:]: v for k, v in batch.items() if k.startswith("aux_")}
    return inputs, targets


@torch.no_grad()
def grounding_gap(model: Any, batch: dict[str, torch.Tensor], qwen: bool) -> tuple[float, float]:
    """Answer loss with the true images and with the images rolled by one across the batch.

    The difference says how much the model uses the image (0 = not at all)."""
    was_training = model.training
    model.eval()
    true = float(model(**batch, use_cache=False).loss)
    pix = batch["pixel_values"]
    b = int(batch["input_ids"].shape[0])
    rolled = pix.reshape(b, -1, *pix.shape[1:]).roll(1, 0).reshape(pix.shape) if qwen else pix.roll(1, 0)
    shuffled = float(model(**{**batch, "pixel_values": rolled}, use_cache=False).loss)
    model.train(was_training)
    return true, shuffled


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Two phases inside one time budget: ``--vision-minutes`` of vision-only steps on the
    dense patch targets, then joint steps (LM answer loss + ``--aux-weight`` x patch loss)."""
    torch.set_num_threads(args.threads)
    name = args.model
    out = Path(args.out) if args.out else MODELS_DIR / name
    ckpt_dir = Path(args.ckpt_dir) if args.ckpt_dir else CKPT_ROOT / name
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = ckpt_dir / "ckpt.pt"
    processor = build_processor(ZOO_MODELS[name])
    theta = args.rope_theta or (saved_rope_theta(Path(args.init_from)) if args.init_from else None)
    overrides: dict[str, Any] = {"rope_theta": theta} if theta else {}
    if args.lm_from:  # the donor's LM width; the depth stays this model's (extra layers start as identities)
        overrides.update({k: v for k, v in donor_text_config(args.lm_from).items() if k != "layers"})
    model = build_model(name, processor, seed=args.seed, dominant=args.dominant, **overrides)
    previous = load_weights(model, Path(args.init_from)) if args.init_from else None
    lm_plan = transplant_lm(model, _load_donor(args.lm_from)) if args.lm_from else None
    model.train()
    qwen = name == "tiny-qwen2-vl"
    aux_head = VisionAuxHead(model.config.text_config.hidden_size, class_token_ids(processor.tokenizer))
    embed = model.get_input_embeddings().weight
    batcher = Batcher(name, processor, drill=args.drill, position_drill=args.position_drill)
    pos_aux = (LMPositionAux(model, args.lm_position_layer, batcher.image_token_id)
               if args.lm_position_weight > 0 else None)
    ref_aux = ReferentPositionAux(model, args.referent_layer) if args.referent_weight > 0 else None
    compare = ReferentPositionAux(model, args.compare_layer) if args.compare_weight > 0 else None
    pointer = (ReferentAttentionAux(model, args.pointer_layer, args.pointer_head, batcher.image_token_id)
               if args.pointer_weight > 0 else None)
    gather = (PhraseGatherAux(model, args.gather_layer, tuple(args.gather_heads))
              if args.gather_weight > 0 else None)
    drop_cfg = (TokenDropConfig(dense=args.drop_dense, pre_llm=args.drop_pre_llm, min_keep=args.drop_min_keep,
                                max_layer=args.drop_max_layer, patterns=tuple(args.drop_patterns),
                                chain=args.drop_chain) if args.token_drop else None)
    token_drop = TokenDrop(model) if drop_cfg is not None else None
    params = list(model.parameters()) + list(aux_head.parameters())
    for extra in (pos_aux, ref_aux, compare):
        if extra is not None:
            params += list(extra.head.parameters())
    # the frozen fixed-offset weights get no gradient, and must not shrink under AdamW's decay either
    frozen = {id(p) for p, _ in position_rows(model).values()} if args.hard_offsets else set()
    lm_ids = {id(p) for p in (*model.model.language_model.parameters(), *model.lm_head.parameters())}
    scale = lambda p: args.lm_lr_scale if id(p) in lm_ids else 1.0  # noqa: E731
    groups = [{"params": [p for p in params if id(p) not in frozen and scale(p) == f], "lr_scale": f}
              for f in sorted({1.0, args.lm_lr_scale})]
    groups.append({"params": [p for p in params if id(p) in frozen], "weight_decay": 0.0, "lr_scale": 1.0})
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    state = {"step": 0, "vision_steps": 0, "samples": 0, "elapsed": 0.0, "loss_ema": None, "aux_ema": None,
             "history": []}
    budget = args.minutes * 60.0
    if ckpt_path.is_file() and not args.fresh:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        aux_head.load_state_dict(ck["aux_head"])
        if pos_aux is not None and "lm_position_head" in ck:
            pos_aux.head.load_state_dict(ck["lm_position_head"])
        if ref_aux is not None and "referent_head" in ck:
            ref_aux.head.load_state_dict(ck["referent_head"])
        if compare is not None and "compare_head" in ck:
            compare.head.load_state_dict(ck["compare_head"])
        opt.load_state_dict(ck["opt"])
        state = {**state, **ck["state"]}
        budget = ck.get("budget", budget) if not args.new_budget else budget
        print(f"resumed {name} from {ckpt_path}: step {state['step']}, {state['samples']} samples, "
              f"{state['elapsed'] / 60:.1f} of {budget / 60:.1f} min", flush=True)
    capture = FeatureCapture(model, qwen)
    lo, hi = SPLITS["train"]
    probe_lo = SPLITS["val"][0]
    probe_batch, _ = _split_aux(batcher.batch(list(range(probe_lo, probe_lo + 8)), random.Random("probe")))
    probe_batch = isolate_turns(model, probe_batch)
    last_probe = time.time()

    def save_ckpt() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "aux_head": aux_head.state_dict(), "opt": opt.state_dict(),
                    **({"lm_position_head": pos_aux.head.state_dict()} if pos_aux is not None else {}),
                    **({"referent_head": ref_aux.head.state_dict()} if ref_aux is not None else {}),
                    **({"compare_head": compare.head.state_dict()} if compare is not None else {}),
                    "state": state, "budget": budget, "args": vars(args)}, tmp)
        os.replace(tmp, ckpt_path)

    def ema(key: str, value: float) -> float:
        state[key] = value if state[key] is None else 0.95 * state[key] + 0.05 * value
        return state[key]

    # the tower's attention stays the fixed-offset pattern it starts with, and vision-only steps
    # compute it as a hard gather instead of a 577 x 577 softmax (same function, several times faster)
    hard = FixedOffsetMode(model, IMAGE_SIZE // PATCH_SIZE) if args.hard_offsets else None
    if hard is not None:
        freeze_local_attention(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"training {name}: {n_params / 1e6:.2f} M params, batch {args.batch}, lr {args.lr}, "
          f"budget {budget / 60:.1f} min (first {args.vision_minutes:g} vision-only)", flush=True)
    t_start = time.time() - state["elapsed"]
    last_ckpt = last_log = log_t = time.time()
    log_samples = 0
    while True:
        elapsed = time.time() - t_start
        if elapsed >= budget:
            break
        vision_phase = elapsed < args.vision_minutes * 60
        rng = random.Random(f"train-{args.seed}-{state['step']}")
        lr = _lr(elapsed / budget, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        if hard is not None and hard.active != vision_phase:
            hard.on() if vision_phase else hard.off()
        if vision_phase:
            seeds = [rng.randrange(lo, hi) for _ in range(args.vision_batch)]
            inputs, targets = _split_aux(batcher.images(seeds))
            image_features_only(model, inputs, qwen)
            aux, acc = aux_head.loss(capture.take(len(seeds)), targets, embed)
            loss = aux
            state["vision_steps"] += 1
        else:
            seeds = [rng.randrange(lo, hi) for _ in range(args.batch)]
            inputs, targets = _split_aux(batcher.batch(seeds, rng))
            inputs = isolate_turns(model, inputs)
            if token_drop is not None:  # visual tokens go missing, before the LLM or at random layers
                token_drop.arm(draw_plan(inputs["input_ids"], batcher.image_token_id, token_drop.n_layers,
                                         drop_cfg, rng, objects=targets["shape"].flatten(1) > 0))
            lm = model(**inputs, use_cache=False).loss
            if token_drop is not None:
                token_drop.disarm()
            aux, acc = aux_head.loss(capture.take(len(seeds)), targets, embed)
            loss = lm + args.aux_weight * aux
            if pos_aux is not None:
                pos_loss, pos_r2 = pos_aux.loss(inputs["input_ids"])
                loss = loss + args.lm_position_weight * pos_loss
                acc.update(pos_r2)
            if ref_aux is not None:
                ref_loss, ref_r2 = ref_aux.loss(targets["referent_index"], targets["referent_xy"])
                loss = loss + args.referent_weight * ref_loss
                acc.update(ref_r2)
            if compare is not None:
                cmp_loss, cmp_r2 = compare.loss(targets["compare_index"], targets["compare_dxy"])
                loss = loss + args.compare_weight * cmp_loss
                acc.update({f"cmp_{k[4:]}": v for k, v in cmp_r2.items()})
            if pointer is not None:
                ptr_loss, ptr_log = pointer.loss(inputs["input_ids"], targets["referent_index"],
                                                 targets["referent_xy"], targets["referent_radius"])
                loss = loss + args.pointer_weight * ptr_loss
                acc.update(ptr_log)
            if gather is not None:
                g_loss, g_log = gather.loss(targets["referent_index"], targets["compare_index"])
                loss = loss + args.gather_weight * g_loss
                acc.update(g_log)
            ema("loss_ema", float(lm.detach()))
        ema("aux_ema", float(aux.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        state["step"] += 1
        state["samples"] += len(seeds)
        log_samples += len(seeds)
        state["elapsed"] = time.time() - t_start
        now = time.time()
        if now - last_log >= args.log_seconds:
            sps = log_samples / (now - log_t)
            lm_ema = state["loss_ema"]
            entry = {"step": state["step"], "samples": state["samples"], "minutes": round(state["elapsed"] / 60, 2),
                     "phase": "vision" if vision_phase else "joint",
                     "loss": None if lm_ema is None else round(lm_ema, 4), "aux": round(state["aux_ema"], 4),
                     "aux_acc": {k: round(v, 3) for k, v in acc.items()}}
            state["history"].append(entry)
            accs = " ".join(f"{k}={v:.2f}" for k, v in acc.items())
            print(f"[{name}] {entry['phase']} step {state['step']} samples {state['samples']} "
                  f"{state['elapsed'] / 60:5.1f}/{budget / 60:.0f} min lm {entry['loss']} aux {entry['aux']} "
                  f"({accs}) lr {lr:.2e} {sps:.2f} samples/s", flush=True)
            last_log, log_t, log_samples = now, now, 0
        if not vision_phase and now - last_probe >= args.probe_minutes * 60:
            true, shuffled = grounding_gap(model, probe_batch, qwen)
            state["history"].append({"step": state["step"], "minutes": round(state["elapsed"] / 60, 2),
                                     "val_loss": round(true, 4), "val_loss_shuffled_images": round(shuffled, 4)})
            print(f"[{name}] probe: val answer loss {true:.3f} with true images, {shuffled:.3f} with shuffled "
                  f"(gap {shuffled - true:+.3f})", flush=True)
            last_probe = time.time()
        if now - last_ckpt >= args.ckpt_minutes * 60:
            save_ckpt()
            last_ckpt = now
    if hard is not None:
        hard.off()  # the saved model uses the stock attention
    save_ckpt()
    capture.remove()
    if token_drop is not None:
        token_drop.remove()
    for extra in (gather, pointer, compare, ref_aux, pos_aux):  # reverse order: two eager captures may share a layer
        if extra is not None:
            extra.remove()
    wall = state["elapsed"]
    info = {
        "trained": True,
        "model": name,
        "seed": args.seed,
        "samples_seen": state["samples"],
        "data": "shapes-world train split: vision-only steps on per-patch targets (shape/colour/size/word/"
                "centre), then all questions of a scene as isolated turns (each sees only the image and "
                "itself, mmeff.zoo.isolated_turns) + the patch targets",
        "steps": state["step"],
        "vision_only_steps": state["vision_steps"],
        "vision_tower_start": "convolution-like attention (mmeff.zoo.local_attention_init); vision-only steps "
                              + ("with hard fixed-offset attention" if args.hard_offsets else "with softmax attention"),
        "position_dominant_layernorms": args.dominant,
        "grounding_drill": args.drill,
        "position_drill": args.position_drill if args.drill else 0,
        "batch_size": args.batch,
        "vision_batch_size": args.vision_batch,
        "aux_weight": args.aux_weight,
        "lm_position_aux": ({"weight": args.lm_position_weight, "layer": args.lm_position_layer}
                            if args.lm_position_weight > 0 else None),
        "referent_position_aux": ({"weight": args.referent_weight, "layer": args.referent_layer}
                                  if args.referent_weight > 0 else None),
        "compare_aux": ({"weight": args.compare_weight, "layer": args.compare_layer}
                        if args.compare_weight > 0 else None),
        "referent_attention_aux": ({"weight": args.pointer_weight, "layer": args.pointer_layer,
                                    "head": args.pointer_head} if args.pointer_weight > 0 else None),
        "phrase_gather_aux": ({"weight": args.gather_weight, "layer": args.gather_layer,
                               "heads": list(args.gather_heads)} if args.gather_weight > 0 else None),
        "token_drop": (dict(dataclasses.asdict(drop_cfg), pattern_names=list(PATTERNS),
                            mechanism="kept sets drawn as uniform subsets, random grid rectangles or object tokens "
                            "from the scene labels (no pruner score), key columns blocked for every query from "
                            "layer K on (K=0: before the LLM), optionally thinned again at a later layer, "
                            "original positions kept: exactly mmeff's cut (tests/zoo/test_token_drop.py)")
                       if drop_cfg is not None else None),
        "lr": args.lr,
        "lm_lr_scale": args.lm_lr_scale,
        "lm_transplanted_from": ({"path": str(args.lm_from), "layer_plan": lm_plan} if lm_plan is not None else None),
        "wall_minutes": round(wall / 60, 2),
        "samples_per_s": round(state["samples"] / max(wall, 1e-9), 3),
        "final_loss_ema": round(state["loss_ema"], 4) if state["loss_ema"] is not None else None,
        "final_aux_ema": round(state["aux_ema"], 4) if state["aux_ema"] is not None else None,
        "machine": f"{platform.machine()} {platform.processor() or ''} CPU, {args.threads} threads, "
                   f"torch {torch.__version__}".strip(),
        "params": n_params,
        "config": {**SIZES[name], **overrides},
        "history": state["history"],
    }
    if previous is not None:
        info["initialised_from"] = {"path": str(args.init_from),
                                    **{k: v for k, v in previous.items() if k not in ("history", "config")}}
    save_final(model, processor, out, info)
    print(json.dumps({k: v for k, v in info.items() if k != "history"}, indent=2))
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m mmeff.zoo.train_vlm")
    p.add_argument("--model", required=True, choices=sorted(SIZES),
                   help="architecture to build (a fine-tuned zoo model such as tiny-llava-tokendrop is trained as "
                        "its parent with --init-from and --out)")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--out", default=None, help="output folder (default mmeff/zoo/models/<name>)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vision-batch", type=int, default=16)
    p.add_argument("--vision-minutes", type=float, default=5.0, help="vision-only minutes at the start")
    p.add_argument("--no-hard-offsets", dest="hard_offsets", action="store_false",
                   help="let the tower's attention train freely (softmax in every step) instead of keeping "
                        "the fixed-offset start (hard gather in vision-only steps)")
    p.add_argument("--probe-minutes", type=float, default=3.0, help="how often to log the grounding gap")
    p.add_argument("--aux-weight", type=float, default=0.5, help="weight of the patch-target loss in joint steps")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--log-seconds", type=float, default=30.0)
    p.add_argument("--ckpt-dir", default=None, help="checkpoint folder (default .zoo_ckpt/<name>)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--new-budget", action="store_true", help="on resume, use --minutes as the new total")
    p.add_argument("--drill", action="store_true",
                   help="add every shape's existence and count question to each scene (more supervision of "
                        "matching a question word against the image, at little cost: the image is encoded once)")
    p.add_argument("--position-drill", type=int, default=0,
                   help="with --drill, also up to this many extra relative-position questions per scene")
    p.add_argument("--lm-position-weight", type=float, default=0.0,
                   help="weight of a read-out of each image token's grid position from an LM layer "
                        "(mmeff.zoo.lm_position_aux), so the LM computes absolute positions it can compare")
    p.add_argument("--lm-position-layer", type=int, default=1, help="the LM layer that read-out reads")
    p.add_argument("--referent-weight", type=float, default=0.0,
                   help="weight of a read-out of each position question's objects' centres at their phrase's "
                        "last token (mmeff.zoo.referent_position_aux): supervises the look-up the comparison needs")
    p.add_argument("--referent-layer", type=int, default=4, help="the LM layer the referent read-out reads")
    p.add_argument("--compare-weight", type=float, default=0.0,
                   help="weight of a read-out of (x_A - x_B, y_A - y_B) at each position question's final token: "
                        "the comparison's input, gathered from the two looked-up objects")
    p.add_argument("--compare-layer", type=int, default=5, help="the LM layer the comparison read-out reads")
    p.add_argument("--pointer-weight", type=float, default=0.0,
                   help="weight of a loss that makes one attention head point at the object each position "
                        "question's phrase names (mmeff.zoo.referent_position_aux.ReferentAttentionAux)")
    p.add_argument("--pointer-layer", type=int, default=2, help="the LM layer of the pointing head")
    p.add_argument("--pointer-head", type=int, default=0, help="the pointing head")
    p.add_argument("--gather-weight", type=float, default=0.0,
                   help="weight of the phrase-gather loss: at a position question's final token two heads attend "
                        "to the two object phrases' last tokens (mmeff.zoo.referent_position_aux.PhraseGatherAux)")
    p.add_argument("--gather-layer", type=int, default=5, help="the LM layer of the gathering heads")
    p.add_argument("--gather-heads", type=lambda t: [int(x) for x in t.split(",")], default=[0, 1],
                   help="two heads: the first gathers object A, the second object B (default 0,1)")
    p.add_argument("--rope-theta", type=float, default=None,
                   help="override the LM's RoPE base (SIZES). Qwen2-VL's M-RoPE gives the column (w) axis the lowest "
                        "frequencies: with base 1e6 and 32-dim heads they turn by < 0.002 rad across the 12-column "
                        "grid, so the LM cannot tell columns apart; base 50 turns them by 0.3-1 rad")
    p.add_argument("--dominant", type=float, default=None,
                   help="tiny-llava: start the CLIP tower with position-dominant LayerNorms of this gain (e.g. 20), "
                        "so its fixed-offset attention does not drift as content grows (local_attention_init)")
    p.add_argument("--init-from", default=None,
                   help="start from the weights of a saved zoo model folder (e.g. the shipped one) instead of "
                        "a random init; ignored when a checkpoint is resumed")
    p.add_argument("--lm-from", default=None,
                   help="start the language model from this saved zoo model's LM (e.g. tiny-qwen2-vl for "
                        "tiny-llava: same tokenizer, same decoder block; mmeff.zoo.lm_transplant), with its width "
                        "and extra layers as identities; the vision tower and projector start fresh")
    p.add_argument("--lm-lr-scale", type=float, default=1.0,
                   help="learning-rate factor for the LM's parameters (e.g. 0.3 for a transplanted LM)")
    p.add_argument("--token-drop", action="store_true",
                   help="method-agnostic token-drop augmentation (mmeff.zoo.token_drop): per sample, a kept set "
                        "(uniform subset, random grid rectangles, or object tokens from the scene labels) is cut "
                        "before the LLM or at a random layer, at a random budget, so the model learns to answer "
                        "with tokens missing (no pruner's score is used)")
    p.add_argument("--drop-dense", type=float, default=0.25, help="share of samples left dense under --token-drop")
    p.add_argument("--drop-pre-llm", type=float, default=0.5, help="share of drops made before the LLM (else in it)")
    p.add_argument("--drop-min-keep", type=float, default=0.04,
                   help="smallest kept fraction of the image tokens (log-uniform in [this, 1])")
    p.add_argument("--drop-max-layer", type=int, default=4, help="in-LLM drops happen at a layer in [1, this]")
    p.add_argument("--drop-patterns", type=float, nargs=3, default=[0.3, 0.3, 0.4], metavar=("UNIFORM", "BLOCKS", "OBJECTS"),
                   help="relative weights of the kept-set patterns under --token-drop")
    p.add_argument("--drop-chain", type=float, default=0.25,
                   help="probability that a drop is followed by a second cut at a later layer (a chain of cuts)")
    p.add_argument("--init-only", action="store_true", help="save an untrained model + processor and exit")
    args = p.parse_args(argv)
    if args.init_only:
        init_only(args.model, Path(args.out) if args.out else MODELS_DIR / args.model, args.seed)
        return 0
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
