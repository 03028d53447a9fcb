"""The ``optden`` command line; each subcommand lives in ``optden/commands/<name>.py``."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import OptdenError

#: Subcommand modules, in the order ``optden --help`` lists them (benchmarks are bench/*.py
#: in the source tree, ``make bench``; they are not a command of the installed package).
COMMANDS = ("demo", "sample", "meanshift", "deviation", "posterior", "compare", "index", "dataset", "info")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="optden", description="Exact, certified empirical optimal denoiser.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"optden.commands.{name}").register(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (OptdenError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"optden {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
