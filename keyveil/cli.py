"""The `keyveil` command: one sub-command module per job under `keyveil.commands`.

Every failure ends in one line on stderr and a non-zero exit; `--debug` shows the
traceback instead. Exit codes: 1 the operation failed or was refused, 2 bad input or
configuration, 3 a dependency (NATS, Redis, a service) could not be reached.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Sequence
from importlib import metadata

__all__ = ["describe_failure", "main"]

# Each module defines `register(subparsers)` and sets `handler` (args -> exit code).
COMMANDS = (
    "up",
    "bootstrap",
    "alerts",
    "audit",
    "tokens",
    "sessions",
    "budgets",
    "spend",
    "env",
    "keys",
    "openapi",
    "blocks",
    "rediskeys",
)

_CREDENTIALS_IN_URL = re.compile(r"(//)[^@/\s]*@")


def version() -> str:
    try:
        return metadata.version("keyveil")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keyveil", description="keyveil operator tools")
    parser.add_argument("--version", action="version", version=f"keyveil {version()}")
    parser.add_argument(
        "--state-dir",
        default=".keyveil",
        help="where `keyveil up` keeps its state and stack.json (default: .keyveil)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on failure")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"keyveil.commands.{name}").register(sub)
    _accept_everywhere(parser)
    return parser


def _accept_everywhere(parser: argparse.ArgumentParser) -> None:
    """Let `--state-dir` and `--debug` follow any sub-command too (`keyveil up --state-dir X`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if "--state-dir" not in child._option_string_actions:
                    child.add_argument(
                        "--state-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS
                    )
                if "--debug" not in child._option_string_actions:
                    child.add_argument(
                        "--debug",
                        action="store_true",
                        default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS,
                    )
                _accept_everywhere(child)


def describe_failure(exc: BaseException) -> tuple[str, int]:
    """One line naming what failed (never a value or a secret), and the exit code."""
    import nats.errors
    from pydantic import ValidationError

    from keyveil.operator import CommandError
    from shared.errors import BusError, ConfigError, KeyveilError

    if isinstance(exc, CommandError):
        return str(exc), exc.exit_code
    if isinstance(exc, ValidationError):
        fields = sorted(
            {".".join(str(p) for p in e["loc"]) or "input" for e in exc.errors(include_input=False)}
        )
        rules = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)[:3]
        )
        return f"invalid {', '.join(fields)} ({rules})", 2
    if isinstance(exc, ConfigError):
        return str(exc), 2
    if isinstance(exc, nats.errors.NoServersError | nats.errors.ConnectionClosedError):
        return "cannot reach NATS (is `keyveil up` running? else set NATS_URL)", 3
    if isinstance(exc, BusError | nats.errors.Error):
        return f"the bus failed: {_safe(str(exc)) or type(exc).__name__}", 3
    if isinstance(exc, ConnectionError | TimeoutError):
        return f"cannot connect ({type(exc).__name__}; is `keyveil up` running?)", 3
    if isinstance(exc, KeyveilError):
        return _safe(str(exc)) or type(exc).__name__, 1
    if isinstance(exc, FileNotFoundError | PermissionError):
        return f"{exc.strerror}: {exc.filename}", 2
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror or 'operating system error'}", 3
    if isinstance(exc, ValueError):
        return _safe(str(exc)) or "invalid value", 2
    return f"unexpected {type(exc).__name__} (run with --debug for the traceback)", 1


def _safe(text: str) -> str:
    """First line of `text`, with any user:password@ removed from URLs in it."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return _CREDENTIALS_IN_URL.sub(r"\1***@", first)[:300]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if getattr(args, "debug", False):
            raise
        line, code = describe_failure(exc)
        print(f"keyveil {args.command}: {line}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
