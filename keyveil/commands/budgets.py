"""`keyveil budgets set|show|remove|reset`: the spend budgets every proxy enforces.

Budgets live in Redis (REDIS_URL, else the local stack's `redis_url`; see
`shared.budgets`); a change applies to the next request on every replica.

    keyveil budgets set user <user-hash> micros day 5000000   # $5 a day for one user
    keyveil budgets set user '*' tokens minute 40000          # a TPM for every user
    keyveil budgets set global all micros month 2000000000    # $2,000 a month in all
    keyveil budgets set user '*' seconds day 3600             # an hour of live voice a day
    keyveil budgets show [--json]
    keyveil budgets remove user '*' tokens minute
    keyveil budgets reset user <user-hash>                    # forget counted usage
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import redis.exceptions

from keyveil.operator import load_stack
from shared.budgets import SCOPES, UNITS, WINDOWS, BudgetAdmin
from shared.ratelimit import redis_client

__all__ = ["register"]

_REDIS_TROUBLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "budgets", help="spend budgets (tokens, micro-dollars, voice seconds)"
    )
    sub = parser.add_subparsers(dest="budgets_command", required=True, metavar="ACTION")
    for name, text in (("set", "set a budget's limit"), ("remove", "remove a budget")):
        action = sub.add_parser(name, help=text)
        action.add_argument("scope", choices=SCOPES)
        action.add_argument("subject", help="token id, user hash, app, 'all' (global) or '*'")
        action.add_argument("unit", choices=UNITS)
        action.add_argument("window", choices=WINDOWS)
        if name == "set":
            action.add_argument("limit", type=int)
    show = sub.add_parser("show", help="every budget with its use in the current window")
    show.add_argument("--json", action="store_true", help="one JSON object per line")
    reset = sub.add_parser("reset", help="forget the usage counted against a subject")
    reset.add_argument("scope", choices=SCOPES)
    reset.add_argument("subject")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    url = os.environ.get("REDIS_URL") or load_stack(Path(args.state_dir)).get("redis_url")
    if not url:
        print("keyveil budgets: set REDIS_URL (or run `keyveil up`)", file=sys.stderr)
        return 2
    if getattr(args, "limit", 0) < 0:
        print("keyveil budgets: limit must be 0 or more", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args, url))
    except _REDIS_TROUBLE:
        print("keyveil budgets: Redis is unreachable", file=sys.stderr)
        return 1


async def _run(args: argparse.Namespace, url: str) -> int:
    store = redis_client(url, timeout_s=3.0)
    admin = BudgetAdmin(store)
    try:
        command = args.budgets_command
        if command == "set":
            await admin.set(args.scope, args.subject, args.unit, args.window, args.limit)
            print(f"{args.scope}:{args.subject} {args.unit}/{args.window} = {args.limit}")
            return 0
        if command == "remove":
            found = await admin.remove(args.scope, args.subject, args.unit, args.window)
            print("removed" if found else "no such budget")
            return 0 if found else 1
        if command == "reset":
            print(f"{await admin.reset(args.scope, args.subject)} counter(s) cleared")
            return 0
        states = await admin.show()
        if args.json:
            for state in states:
                print(json.dumps(asdict(state)))
            return 0
        print(f"{'BUDGET':<52} {'LIMIT':>14} {'USED':>14} {'HELD':>12}")
        for s in states:
            name = f"{s.scope}:{s.subject[:24]} {s.unit}/{s.window}"
            print(f"{name:<52} {s.limit:>14} {s.used:>14} {s.held:>12}")
        return 0
    finally:
        await store.aclose()
