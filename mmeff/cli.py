"""``mmeff`` command line: a small dispatcher over subcommand modules.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``, which adds its parser
and sets ``func=run`` (``run(args) -> int``). To add one, append ``(name, module)`` to
:data:`SUBCOMMANDS`; modules that are not installed are left out of the command line.
Subcommand modules import heavy libraries inside ``run`` so ``mmeff --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: list[tuple[str, str]] = [
    ("eval", "mmeff.eval.cli_eval"),
    ("info", "mmeff.cli_info"),
    ("calibrate", "mmeff.calibrate.cli_calibrate"),
    ("demo", "mmeff.demo.cli_demo"),
]
"""(subcommand, module with ``add_parser``), in help order."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="mmeff", description="Make multimodal models cheaper and more faithful without retraining them.")
    parser.add_argument("--version", action="version", version=f"mmeff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):  # this subcommand is not part of the install
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # as given (``mmeff eval --processes`` re-launches itself with them)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 1
    return int(func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
