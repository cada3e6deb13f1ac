"""The `keyveil` command: one sub-command module per job under `keyveil.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

# Each module defines `register(subparsers)` and sets `handler` (args -> exit code).
COMMANDS = (
    "up",
    "bootstrap",
    "alerts",
    "audit",
    "tokens",
    "sessions",
    "budgets",
    "env",
    "keys",
    "openapi",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keyveil", description="keyveil operator tools")
    parser.add_argument(
        "--state-dir",
        default=".keyveil",
        help="where `keyveil up` keeps its state and stack.json (default: .keyveil)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"keyveil.commands.{name}").register(sub)
    _accept_state_dir_everywhere(parser)
    return parser


def _accept_state_dir_everywhere(parser: argparse.ArgumentParser) -> None:
    """Let `--state-dir` follow any sub-command too (`keyveil up --state-dir X`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if "--state-dir" not in child._option_string_actions:
                    child.add_argument(
                        "--state-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS
                    )
                _accept_state_dir_everywhere(child)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
