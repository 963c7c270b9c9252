"""``mmeff demo``: the gradio app on the shipped tiny models (local only unless ``--share``)."""
from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="gradio demo: dense vs pruned VLM answers, guidance, video sparse attention",
                       description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="ask gradio for a public link (needs internet)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ModuleNotFoundError:
        print("mmeff demo needs gradio: pip install 'mmeff[demo]' (scripts/setup.sh installs it)")
        return 2
    import torch

    from .app import build_app

    if args.threads:
        torch.set_num_threads(args.threads)
    build_app().launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0
