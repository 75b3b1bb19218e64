"""The `mixprec` command: one thin subcommand per stage (parser -> validated config -> stage main).

Each stage module exposes `register(subparsers)`, which adds its parser and sets `run`, a function
taking the parsed namespace and returning an exit code. Bad input (`MixprecError`) becomes a one-line
error and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from mixprec.cli.checks import check_args
from mixprec.core.errors import MixprecError
from mixprec.core.version import __version__

__all__ = ["main", "build_parser", "STAGES"]

#: Stage modules under mixprec.cli, in the order they appear in `mixprec --help`.
STAGES = ("inspect", "quantize", "measure", "search", "compile", "eval", "report", "dashboard", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixprec", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mixprec {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        importlib.import_module(f"mixprec.cli.{stage}_cmd").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_args(args)
        return int(args.run(args) or 0)
    except MixprecError as exc:
        print(f"mixprec {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
