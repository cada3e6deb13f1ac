"""`keyveil up`: run the whole system locally in the foreground."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from keyveil.stack import StackOptions, run_stack

__all__ = ["register"]


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "up", help="run every service locally with real NATS and Redis (Ctrl-C stops)"
    )
    parser.add_argument("--demo", action="store_true", help="canned answers, no upstream calls")
    parser.add_argument(
        "--fake-upstream",
        action="store_true",
        help="start the OpenAI-compatible fake and point OPENAI_BASE_URL at it",
    )
    parser.add_argument("--proxy-replicas", type=int, default=1, metavar="N")
    parser.add_argument(
        "--base-port",
        type=int,
        default=8080,
        help="token=PORT, proxy=PORT+1, keymanager=PORT+2, auditor=PORT+3; 0 picks free ports",
    )
    parser.set_defaults(handler=_up)


def _up(args: argparse.Namespace) -> int:
    if args.proxy_replicas < 1:
        raise SystemExit("keyveil up: --proxy-replicas must be at least 1")
    return run_stack(
        StackOptions(
            state_dir=Path(args.state_dir),
            demo=args.demo,
            fake_upstream=args.fake_upstream,
            proxy_replicas=args.proxy_replicas,
            base_port=args.base_port,
        )
    )
