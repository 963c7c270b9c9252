"""Dense (unpruned) accuracy of a VLM on held-out shapes-world scenes.

Usage::

    python -m mmeff.zoo.eval_dense --model tiny-llava --n 500

Greedy generation through the processor's chat template on ``n`` scenes of the *test*
split (questions from :func:`mmeff.zoo.world.build_split`). Scores:

- accuracy per question family: exact match of the normalised answer (lower case, stripped
  of spaces and a final ".") against the canonical short answer;
- existence per POPE setting (random / popular / adversarial) with the yes-rate, plus the
  *biased adversarial* slice: absent partner shapes of a present trigger, where
  ``hallucination_rate`` = fraction answered "yes";
- accuracy on the ``meta["biased"]`` slice of every family;
- captions: exact match with the canonical caption and CHAIR (:func:`world.chair_scores`).

The JSON goes to ``eval_dense.json`` next to the model (zoo name or local folder) unless
``--out`` says otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .load import ZOO_MODELS, load, zoo_path
from .processors import chat
from .world import build_split, chair_scores, generate_scene, render, scene_of


def normalise(text: str) -> str:
    t = text.strip().lower()
    while t.endswith("."):
        t = t[:-1].rstrip()
    return " ".join(t.split())


@torch.inference_mode()
def answer(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    questions: Sequence[str],
    *,
    max_new_tokens: int = 8,
) -> list[str]:
    """Greedy answers, one per (image, question), batched with left padding."""
    texts = [processor.apply_chat_template(chat(q), add_generation_prompt=True) for q in questions]
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=list(images), text=texts, return_tensors="pt", padding=True)
    inputs = inputs.to(model.device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [s.strip() for s in processor.batch_decode(new, skip_special_tokens=True)]


@torch.inference_mode()
def answer_shared_image(
    model: Any,
    processor: Any,
    image: Any,
    questions: Sequence[str],
    *,
    max_new_tokens: int = 8,
) -> list[str]:
    """Greedy answers to several questions about one image, prefilling the image prefix once.

    The chat prompt is ``<s><|user|>{image tokens}{question}...``: everything up to the last
    image token is shared, so it is run once and its KV cache is copied per question
    (greedy decoding identical to ``generate`` on each prompt from scratch, up to float
    rounding; tests check this). Used for
    LLaVA, whose 576 visual tokens dominate the cost; falls back to :func:`answer` for
    models with M-RoPE positions (Qwen2-VL).
    """
    image_token_id = getattr(model.config, "image_token_id", None)
    if getattr(model.config, "model_type", "") != "llava" or image_token_id is None:
        return answer(model, processor, [image] * len(questions), questions, max_new_tokens=max_new_tokens)
    texts = [processor.apply_chat_template(chat(q), add_generation_prompt=True) for q in questions]
    enc = [processor(images=[image], text=[t], return_tensors="pt") for t in texts]
    ids0 = enc[0]["input_ids"]
    where = (ids0[0] == image_token_id).nonzero()
    cut = int(where[-1]) + 1
    for e in enc:
        if not torch.equal(e["input_ids"][0, :cut], ids0[0, :cut]):
            return answer(model, processor, [image] * len(questions), questions, max_new_tokens=max_new_tokens)
    dev = model.device
    eos = processor.tokenizer.eos_token_id
    cache = model(input_ids=ids0[:, :cut].to(dev), pixel_values=enc[0]["pixel_values"].to(dev),
                  use_cache=True).past_key_values
    preds = []
    for e in enc:
        ids = e["input_ids"][:, cut:].to(dev)
        new: list[int] = []
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
            nxt = int(logits.argmax(-1))
            if nxt == eos:
                break
            new.append(nxt)
            ids = torch.tensor([[nxt]], device=dev)
        extra = cache.get_seq_length() - cut
        if extra > 0:
            cache.crop(-extra)  # back to the shared image prefix
        preds.append(processor.decode(new, skip_special_tokens=True).strip())
    return preds


def evaluate(
    model: Any,
    processor: Any,
    n: int = 500,
    *,
    seed_offset: int = 0,
    split: str = "test",
    families: Sequence[str] | None = None,
    caption_tokens: int = 96,
    progress: bool = True,
    max_minutes: float | None = None,
) -> dict[str, Any]:
    """Run the dense evaluation; returns the metrics dict (see module docstring).

    ``max_minutes`` stops after the scene being evaluated when the time is up; the result
    then says how many scenes were done (``n_scenes``) out of ``n_requested``.
    """
    rows = build_split(split, n, seed_offset, families=families)
    by_seed: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_seed[r["seed"]].append(r)
    t0 = time.time()
    results: list[dict[str, Any]] = []
    for k, (seed, rs) in enumerate(by_seed.items()):
        if max_minutes is not None and time.time() - t0 > max_minutes * 60:
            print(f"  time limit: stopping after {k} of {len(by_seed)} scenes", flush=True)
            break
        image = render(scene_of(rs[0]))
        short = [r for r in rs if r["family"] != "caption"]
        caps = [r for r in rs if r["family"] == "caption"]
        preds: list[str] = []
        qs = [r["question"] for r in short + caps]
        if short:
            preds += answer_shared_image(model, processor, image, qs[: len(short)], max_new_tokens=6)
        if caps:
            preds += answer_shared_image(model, processor, image, qs[len(short):], max_new_tokens=caption_tokens)
        for r, p in zip(short + caps, preds):
            results.append({**{k2: r[k2] for k2 in ("id", "seed", "family", "question", "answer", "meta")},
                            "prediction": p, "correct": normalise(p) == normalise(r["answer"])})
        if progress and (k + 1) % 25 == 0:
            acc = sum(x["correct"] for x in results) / len(results)
            print(f"  {k + 1}/{len(by_seed)} scenes, {len(results)} questions, acc {acc:.3f}, "
                  f"{time.time() - t0:.0f}s", flush=True)
    res = summarise(results, seconds=time.time() - t0)
    res["n_requested"] = n
    res["split"] = split
    return res


def _acc(xs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"n": len(xs), "accuracy": round(sum(x["correct"] for x in xs) / len(xs), 4) if xs else None}


def summarise(results: list[dict[str, Any]], seconds: float = 0.0) -> dict[str, Any]:
    fams: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for x in results:
        fams[x["family"]].append(x)
    out: dict[str, Any] = {
        "n_scenes": len({x["seed"] for x in results}),
        "n_questions": len(results),
        "seconds": round(seconds, 1),
        "overall": _acc([x for x in results if x["family"] != "caption"]),
        "families": {f: _acc(xs) for f, xs in sorted(fams.items())},
        "biased": {f: _acc([x for x in xs if x["meta"].get("biased")]) for f, xs in sorted(fams.items())
                   if any(x["meta"].get("biased") for x in xs)},
    }
    ex = fams.get("existence", [])
    pope: dict[str, Any] = {}
    for setting in ("random", "popular", "adversarial"):
        xs = [x for x in ex if x["meta"].get("pope") == setting]
        if xs:
            pope[setting] = {**_acc(xs), "yes_rate": round(
                sum(normalise(x["prediction"]) == "yes" for x in xs) / len(xs), 4)}
    out["pope"] = pope
    adv_neg = [x for x in ex if x["meta"].get("pope") == "adversarial" and x["answer"] == "no"]
    out["biased_adversarial_existence"] = {
        **_acc(adv_neg),
        "hallucination_rate": round(sum(normalise(x["prediction"]) == "yes" for x in adv_neg) / len(adv_neg), 4)
        if adv_neg else None,
    }
    caps = fams.get("caption", [])
    if caps:
        scores = chair_scores([x["prediction"] for x in caps], [generate_scene(x["seed"]) for x in caps])
        out["caption"] = {**_acc(caps), **{k: round(float(v), 4) for k, v in scores.items()}}
    out["examples"] = [
        {k: x[k] for k in ("family", "question", "answer", "prediction")}
        for f in sorted(fams) for x in fams[f][:3]
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    from mmeff.eval.report import versions

    p = argparse.ArgumentParser(prog="python -m mmeff.zoo.eval_dense", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llava", help="zoo name, local folder or hub id")
    p.add_argument("--n", type=int, default=500, help="number of held-out test scenes")
    p.add_argument("--seed-offset", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-minutes", type=float, default=None, help="stop early after this many minutes")
    p.add_argument("--out", default=None, help="output JSON (default: eval_dense.json next to the model)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = load(args.model)
    res = evaluate(model, processor, args.n, seed_offset=args.seed_offset, max_minutes=args.max_minutes)
    res["model"] = args.model
    res["config"] = vars(args)
    res["versions"] = versions()
    if args.out:
        out = Path(args.out)
    elif args.model in ZOO_MODELS:
        out = zoo_path(args.model) / "eval_dense.json"
    else:
        out = Path(args.model) / "eval_dense.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "examples"}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
