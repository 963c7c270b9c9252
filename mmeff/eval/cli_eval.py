"""``mmeff eval``: dense vs mmeff methods on lmms-eval tasks (the mmeff world or any lmms-eval task).

Examples::

    mmeff eval --model tiny-llava --method fastv:budget=64 --tasks mmeff_pope_random,mmeff_colour \\
        --limit 50 --out runs/x.json
    mmeff eval --model tiny-llava --method random:budget=64 --method entropyprune:budget=64 \\
        --tasks mmeff_world --limit 100 --sweep --budgets 192,128,64 --out runs/sweep.json
    mmeff eval --model llava-hf/llava-1.5-7b-hf --method fastv:budget=64 --tasks pope,mme --device cuda

``--method`` takes one spec per flag (repeat the flag for several; ``a+b`` applies two methods
together). Task names starting with ``mmeff_`` are the shapes-world tasks (generated locally,
never downloaded); any other name is an lmms-eval task resolved by its TaskManager.
"""
from __future__ import annotations

import argparse
import time
from typing import Any


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="evaluate dense vs mmeff methods with lmms-eval (tables, JSON, sweep plot)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-llava",
                   help="zoo model (tiny-llava, tiny-qwen2-vl), local folder or hub id (default tiny-llava)")
    p.add_argument("--method", action="append", default=[], metavar="SPEC",
                   help="method spec, e.g. fastv:budget=64 or entropyprune:budget=64,layer=2 (repeatable)")
    p.add_argument("--tasks", type=_csv, default=["mmeff_world"],
                   help="comma-separated task names (default mmeff_world; see `mmeff info` for the local tasks)")
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: all generated rows)")
    p.add_argument("--n", type=int, default=None, help="rows generated per mmeff task (default: --limit, else 500)")
    p.add_argument("--split", default="test", choices=["test", "val", "calib", "train"],
                   help="shapes-world split the mmeff tasks draw their scenes from (default test)")
    p.add_argument("--seed-offset", type=int, default=0, help="first scene of the split to use")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="auto, float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--attn-implementation", default="sdpa")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--sweep", action="store_true", help="run every --method at each of --budgets")
    p.add_argument("--budgets", type=_ints, default=[192, 128, 64], help="sweep budgets (default 192,128,64)")
    p.add_argument("--gen-kwargs", default=None, help="lmms-eval generation overrides, e.g. max_new_tokens=16")
    p.add_argument("--bootstrap-iters", type=int, default=0, help="lmms-eval bootstrap iterations for stderr")
    p.add_argument("--log-samples", action="store_true", help="keep every response in the JSON")
    p.add_argument("--out", default=None, help="JSON report path (default runs/eval-<model>-<time>.json)")
    p.add_argument("--plot", default=None, help="sweep PNG path (default: the --out path with .png)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verbosity", default="WARNING", help="lmms-eval log level (default WARNING)")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    from .runner import EvalConfig

    return EvalConfig(
        model=args.model, methods=list(args.method), tasks=list(args.tasks), limit=args.limit, n=args.n,
        split=args.split, seed_offset=args.seed_offset, batch_size=args.batch_size, device=args.device,
        dtype=args.dtype, attn_implementation=args.attn_implementation, sweep=args.sweep,
        budgets=list(args.budgets), gen_kwargs=args.gen_kwargs, bootstrap_iters=args.bootstrap_iters,
        log_samples=args.log_samples, progress=not args.quiet, verbosity=args.verbosity,
        threads=args.threads,
    )


def default_out(model: str) -> str:
    stem = model.rstrip("/").replace("/", "_")
    return f"runs/eval-{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def run(args: argparse.Namespace) -> int:
    from ..core.errors import MmeffError
    from .runner import main_report

    cfg = config_from_args(args)
    try:
        main_report(cfg, out=args.out or default_out(cfg.model), plot=args.plot)
    except MmeffError as e:
        print(f"mmeff eval: error: {e}")
        return 2
    return 0
