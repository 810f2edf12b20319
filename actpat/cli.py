"""Command-line front end: parse, call the library, print, exit codes.

Each command is a module ``actpat.commands.<name>`` with ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; adding a command is one module plus one entry in ``COMMANDS``.
Bad input (``UserError``) prints one line on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import UserError

COMMANDS = ["profile", "counts", "similarity", "relate", "sts", "allocate", "prune", "eval",
            "reproduce", "report", "demo"]


def add_common(p: argparse.ArgumentParser, model: bool = True) -> None:
    """Options every command shares (DESIGN.md's command-line contract)."""
    p.add_argument("--data-dir", default=os.environ.get("ACTPAT_DATA_DIR"),
                   help="folder with <dataset>/<split>.jsonl|.txt (default: $ACTPAT_DATA_DIR)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if model:
        p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
        p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
        p.add_argument("--trust-remote-code", action="store_true",
                       help="allow a hub model's own code to run (off by default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actpat",
        description="Activation patterns of parameters in language models (AAAI 2025), "
                    "and activation-guided pruning.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"actpat.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"actpat.commands.{name}":
                continue  # command not built yet
            raise
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
