"""The ``optden`` command line; each subcommand lives in ``optden/commands/<name>.py``."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .distributed import DistributedError
from .errors import DiskFullError, OptdenError
from .fileio import describe_os_error

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
    """Run one command. Exit status 0; 2 for bad input (a clear message, no traceback); 1
    when the run itself fails: a full or read-only disk, a dead distributed rank."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DistributedError as exc:
        print(f"optden {args.command}: error: {exc}", file=sys.stderr)
        # a broken process group's native threads can abort the interpreter's teardown
        # (SIGABRT); the error is out, the batches written are on disk: leave now
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    except (OptdenError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"optden {args.command}: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, DiskFullError) else 2
    except OSError as exc:  # a read-only or full disk, a permission, a device error
        print(f"optden {args.command}: error: {describe_os_error(exc, getattr(args, 'out', None))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
