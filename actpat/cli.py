"""Command-line front end: parse, call the library, print, exit codes.

Each command is a module ``actpat.commands.<name>`` with ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; adding a command is one module plus one entry in ``COMMANDS``.
Bad input (``UserError``) prints one line on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError

COMMANDS = ["profile", "counts", "similarity", "relate", "sts", "allocate", "prune", "eval",
            "reproduce", "report", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actpat",
        description="Activation patterns of parameters in language models (AAAI 2025), "
                    "and activation-guided pruning.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"actpat.commands.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"actpat {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"actpat {args.command}: interrupted; finished results and checkpoints are kept",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
