"""``mmeff eval``: dense vs mmeff methods on lmms-eval tasks (the mmeff world or any lmms-eval task).

Examples::

    mmeff eval --model tiny-llava --method fastv:budget=64 --tasks mmeff_pope_random,mmeff_colour \\
        --limit 50 --out runs/x.json
    mmeff eval --model tiny-llava --method random:budget=64 --method entropyprune:budget=64 \\
        --tasks mmeff_world --limit 100 --sweep --budgets 192,128,64 --out runs/sweep.json
    mmeff eval --model llava-hf/llava-1.5-7b-hf --method fastv:budget=64 --tasks pope,mme --device cuda

``--method`` takes one spec per flag (repeat the flag for several; ``a+b`` applies two methods
together). Pruner sizes, one of:
  budget=B  the layer-averaged equivalent budget: visual tokens per image averaged over all LLM layers
            (the papers' 64/128/192). fastv:budget=64,layer=2 on LLaVA-1.5-7B (32 layers, 576 tokens)
            keeps (32*64 - 2*576)/30 = 29 tokens from layer 2 on; layers 0-1 see all 576.
  keep=N    the visual tokens kept per image after the cut (official FastV's "rank"):
            fastv:keep=64,layer=2 keeps 64 from layer 2 on (equivalent budget 96).
  ratio=R   budget as a fraction of each image's visual tokens.
Exit status: 0 when every run ran; 2 for bad input (nothing was run); 3 when a method run was skipped
or the JSON had to be written elsewhere (the JSON says which and why); errors go to stderr.

Task names starting with ``mmeff_`` are the shapes-world tasks (generated locally, never downloaded);
any other name is an lmms-eval task resolved by its TaskManager.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..cli_args import positive_int


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
                   help="method spec, e.g. fastv:budget=64, fastv:keep=64,layer=2 or entropyprune:budget=64,layer=2 "
                        "(repeatable; budget / keep / ratio are explained below)")
    p.add_argument("--tasks", type=_csv, default=["mmeff_world"],
                   help="comma-separated task names (default mmeff_world; see `mmeff info` for the local tasks)")
    p.add_argument("--limit", type=positive_int, default=None, help="documents per task (default: all generated rows)")
    p.add_argument("--n", type=positive_int, default=None, help="rows generated per mmeff task (default: --limit, else 500)")
    p.add_argument("--split", default="test", choices=["test", "val", "calib", "train"],
                   help="shapes-world split the mmeff tasks draw their scenes from (default test)")
    p.add_argument("--seed-offset", type=int, default=0, help="first scene of the split to use")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="auto, float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--attn-implementation", default="sdpa")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--sweep", action="store_true", help="run every --method at each of --budgets")
    p.add_argument("--budgets", type=_ints, default=[192, 128, 64], help="sweep budgets (default 192,128,64)")
    p.add_argument("--gen-kwargs", default=None, help="lmms-eval generation overrides, e.g. max_new_tokens=16")
    p.add_argument("--bootstrap-iters", type=int, default=0, help="lmms-eval bootstrap iterations for stderr")
    p.add_argument("--log-samples", action="store_true", help="keep every response in the JSON")
    p.add_argument("--out", default=None, help="JSON report path, or a folder ending in / to write a new file inside it "
                        "(default runs/eval-<model>-<time>.json); checked before anything runs")
    p.add_argument("--plot", default=None, help="sweep PNG path (default: the --out path with .png)")
    p.add_argument("--processes", type=positive_int, default=1,
                   help="data-parallel processes (torchrun; one per GPU, or CPU cores shared out); lmms-eval splits "
                        "the documents and rank 0 writes the report (default 1)")
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


def run(args: argparse.Namespace) -> int:
    from ..core.errors import MmeffError
    from .runner import failed_runs, main_report

    cfg = config_from_args(args)
    try:
        if args.processes > 1 and world_size() == 1:
            return launch_processes(args, cfg)
        payload = main_report(cfg, out=args.out or "runs/", plot=args.plot)
    except MmeffError as e:
        print(f"mmeff eval: error: {e}", file=sys.stderr)
        return 2
    if payload.get("rank", 0) != 0:
        return 0
    status = 0
    failed = failed_runs(payload)
    if failed:
        reasons = "; ".join(f"{r['label']} ({r.get('error', 'did not run')})" for r in failed)
        print(f"mmeff eval: error: {len(failed)} of {len(payload['runs']) - 1} method run(s) did not run: {reasons}. "
              f"The other runs are in {payload.get('json')}", file=sys.stderr)
        status = 3
    if payload.get("json_error"):
        print(f"mmeff eval: error: could not write {payload['json_error']}; the results were saved to "
              f"{payload['json']} instead", file=sys.stderr)
        status = 3
    if os.environ.get(STATUS_FILE_ENV):
        Path(os.environ[STATUS_FILE_ENV]).write_text(str(status))
    return status


STATUS_FILE_ENV = "MMEFF_EVAL_STATUS_FILE"
"""Where rank 0 of a ``--processes`` run leaves its exit status for the launching process."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def launch_processes(args: argparse.Namespace, cfg: Any) -> int:
    """Check everything and build the task data once, then run ``mmeff eval`` in N processes under torchrun."""
    import subprocess
    import tempfile

    from .data import prepare_tasks
    from .preflight import check_config, check_model_name, resolve_out
    from .runner import plan_runs
    from .tasks import is_local

    check_config(cfg)
    check_model_name(cfg.model)
    plan_runs(cfg)
    out = resolve_out(args.out or "runs/", cfg.model)
    if any(is_local(t) for t in cfg.tasks):
        prepare_tasks(cfg.n or cfg.limit, cfg.split, cfg.seed_offset)  # once, not raced by the ranks
    argv = drop_option(list(args.argv), "--processes") + ["--out", str(out)]
    env = dict(os.environ)
    if cfg.threads is None:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.processes)))
    with tempfile.TemporaryDirectory(prefix="mmeff-eval-") as tmp:
        env[STATUS_FILE_ENV] = str(Path(tmp) / "status")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.processes}",
               "-m", "mmeff.cli", *argv]
        rc = subprocess.call(cmd, env=env)
        status_file = Path(env[STATUS_FILE_ENV])
        if rc != 0 or not status_file.is_file():
            print(f"mmeff eval: error: the {args.processes} processes stopped with status {rc}; see their output above",
                  file=sys.stderr)
            return rc or 1
        return int(status_file.read_text())


def drop_option(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag VALUE`` / ``flag=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out
