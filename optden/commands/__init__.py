"""Subcommands of the ``optden`` command line, one module each.

Each module defines ``register(subparsers)``, which adds its parser and sets
``func(args) -> int`` as the default; ``optden.cli`` builds the parser from them.
"""
