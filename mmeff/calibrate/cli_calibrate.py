"""``mmeff calibrate entropyprune|adaptinfer|vflowopt``: offline calibrations on shapes-world scenes (calib split).

entropyprune: the Entropy Collapse Layer. adaptinfer: the pruning schedule. vflowopt: Bayesian optimisation of
VFlowOpt's hyperparameters at one budget (resumable through an optuna SQLite study next to --out).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

from ..cli_args import positive_int


def add_parser(sub: Any) -> None:
    p = sub.add_parser("calibrate", help="offline calibration writing a per-model JSON (EntropyPrune ECL, "
                                         "AdaptInfer schedule, VFlowOpt BO)")
    p.add_argument("method", choices=["entropyprune", "adaptinfer", "vflowopt"], help="what to calibrate")
    p.add_argument("--model", default="tiny-llava", help="zoo name (tiny-llava, tiny-qwen2-vl) or a local/hub path")
    p.add_argument("--samples", type=positive_int, default=100, help="number of calibration images (calib split seeds)")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--cuts", type=positive_int, default=3, help="adaptinfer: number of pruning layers to find")
    p.add_argument("--top-fraction", type=float, default=0.1,
                   help="adaptinfer: the top share of visual tokens whose set change measures the shift")
    p.add_argument("--out", required=True, help="JSON file to write; load it with entropyprune:calibration=FILE "
                                                "or adaptinfer:schedule=FILE or vflowopt:calibration=FILE")
    p.add_argument("--budget", type=float, default=None,
                   help="vflowopt: layer-averaged visual tokens per image to calibrate for (required)")
    p.add_argument("--trials", type=positive_int, default=100, help="vflowopt: finished BO trials to reach")
    p.add_argument("--seed", type=int, default=0, help="vflowopt: TPE sampler seed")
    p.add_argument("--timeout", type=float, default=None,
                   help="vflowopt: stop starting new trials after this many seconds (the study stays resumable)")
    p.add_argument("--storage", default=None,
                   help="vflowopt: optuna SQLite file holding the study (default: --out with .db); rerun to resume")
    p.set_defaults(func=run)


def question_batches(processor: Any, n: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Processor inputs for n calibration-split scenes, each with one of its own questions (as VQA data)."""
    from ..zoo.world import build_scenes, render
    from ..zoo.world.dataset import question_rng
    from ..zoo.world.questions import make_questions

    scenes = build_scenes("calib", n)
    prompts = []
    for scene in scenes:
        qas = make_questions(scene, question_rng(scene.seed), per_family=1)
        question = qas[scene.seed % len(qas)].question
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
    for i in range(0, n, batch_size):
        chunk = scenes[i:i + batch_size]
        yield dict(processor(images=[render(s) for s in chunk], text=prompts[i:i + batch_size], return_tensors="pt",
                             padding=True))


def world_batches(processor: Any, n: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Processor inputs for n calibration-split scenes with a describe-the-image prompt."""
    from ..zoo.world import build_scenes, render

    scenes = build_scenes("calib", n)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    for i in range(0, n, batch_size):
        chunk = scenes[i:i + batch_size]
        yield dict(processor(images=[render(s) for s in chunk], text=[prompt] * len(chunk), return_tensors="pt",
                             padding=True))


def run(args: argparse.Namespace) -> int:
    from ..core.errors import ConfigError, MmeffError
    from ..eval.preflight import check_writable
    from ..zoo.load import load
    from .adaptinfer_schedule import calibrate_adaptinfer
    from .ecl import calibrate_entropyprune

    if not 0.0 < args.top_fraction <= 1.0:
        print(f"mmeff calibrate: error: --top-fraction must be in (0, 1], got {args.top_fraction}", file=sys.stderr)
        return 2
    try:
        check_writable(Path(args.out), "--out")
        if args.method == "vflowopt" and args.budget is None:
            raise ConfigError("mmeff calibrate vflowopt needs --budget B (layer-averaged visual tokens per image)")
        model, processor = load(args.model)
        if args.method == "vflowopt":
            from .vflowopt_bo import calibrate_vflowopt

            storage = args.storage or str(Path(args.out).with_suffix(".db"))
            result = calibrate_vflowopt(model, question_batches(processor, args.samples, args.batch_size), args.budget,
                                        trials=args.trials, storage=storage, seed=args.seed, out_path=args.out,
                                        timeout=args.timeout, model_name=args.model)
            print(json.dumps({k: result[k] for k in ("model", "budget", "params", "objective_mean_cosine", "trials",
                                                     "samples")}), "->", args.out)
            return 0
        batches = world_batches(processor, args.samples, args.batch_size)
        if args.method == "adaptinfer":
            result = calibrate_adaptinfer(model, batches, args.out, model_name=args.model, n_cuts=args.cuts,
                                          top_fraction=args.top_fraction)
            keys = ("model", "layers", "cut_layers", "samples", "seconds")
        else:
            result = calibrate_entropyprune(model, batches, args.out, model_name=args.model)
            keys = ("model", "ecl", "samples")
    except (MmeffError, ValueError) as e:
        print(f"mmeff calibrate: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: result[k] for k in keys}), "->", args.out)
    return 0
