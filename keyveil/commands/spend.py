"""`keyveil spend --since 1d --by user|app|model|token`: money and units from the usage stream.

Reads `KEYVEIL_USAGE` (proxied calls and voice usage events) over NATS as the operator
and adds up what each event says it cost (`cost_micros`, priced by the proxy with the
price table its `price_version` names) and the units behind it. Events without a cost
(refusals, unpriced models) count as calls only.

    keyveil spend --since 1d --by user
    keyveil spend --since 2026-12-01T00:00 --by model --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import orjson

from keyveil.commands.audit import parse_since
from keyveil.operator import operator_nats
from services.auditor.ledger import read_stream
from shared.events import USAGE_STREAM

__all__ = ["SpendRow", "register", "sum_spend"]

_STREAM = str(USAGE_STREAM.name)
_BY = {"user": "user", "app": "app", "model": "model", "token": "token_id"}


@dataclass
class SpendRow:
    key: str
    calls: int = 0
    cost_micros: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    characters: int = 0

    @property
    def dollars(self) -> float:
        return self.cost_micros / 1_000_000


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def sum_spend(events: Iterable[dict[str, Any]], *, by: str, since: float) -> list[SpendRow]:
    """Rows by `by` (user|app|model|token), most expensive first."""
    field = _BY[by]
    rows: dict[str, SpendRow] = {}
    for event in events:
        ts = event.get("ts")
        if not isinstance(ts, int | float) or ts < since:
            continue
        if event.get("type") not in ("proxy.request", "voice.usage"):
            continue
        key = str(event.get(field) or "-")
        row = rows.setdefault(key, SpendRow(key))
        row.calls += 1 if event.get("type") == "proxy.request" else 0
        row.cost_micros += _int(event.get("cost_micros"))
        row.input_tokens += _int(event.get("prompt_tokens"))
        row.output_tokens += _int(event.get("completion_tokens"))
        seconds = event.get("seconds")
        if isinstance(seconds, int | float) and not isinstance(seconds, bool):
            row.seconds += float(seconds)
        row.characters += _int(event.get("characters"))
    return sorted(rows.values(), key=lambda r: (-r.cost_micros, r.key))


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("spend", help="cost and usage from the usage stream")
    parser.add_argument(
        "--since", required=True, help="a duration back from now (30m, 6h, 1d) or an ISO time"
    )
    parser.add_argument("--by", choices=sorted(_BY), default="app")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        since = parse_since(args.since)
    except argparse.ArgumentTypeError as exc:
        print(f"keyveil spend: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_run(args, since))


async def _run(args: argparse.Namespace, since: float) -> int:
    try:
        nc = await operator_nats(Path(args.state_dir))
    except (OSError, nats.errors.Error) as exc:
        print(f"keyveil spend: cannot reach NATS ({type(exc).__name__})", file=sys.stderr)
        return 2
    events: list[dict[str, Any]] = []
    try:
        async for _, raw in read_stream(nc.jetstream(), _STREAM, start_time=since):
            try:
                event = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict):
                events.append(event)
    except nats.js.errors.NotFoundError:
        print(f"keyveil spend: stream {_STREAM} does not exist (yet)", file=sys.stderr)
        return 2
    finally:
        await nc.close()
    rows = sum_spend(events, by=args.by, since=since)
    if args.json:
        for row in rows:
            print(json.dumps({**asdict(row), "dollars": row.dollars}))
        return 0
    print(
        f"{args.by.upper():<34} {'CALLS':>7} {'USD':>12} {'IN_TOK':>10} {'OUT_TOK':>10} {'SEC':>8}"
    )
    for row in rows:
        print(
            f"{row.key[:34]:<34} {row.calls:>7} {row.dollars:>12.6f} {row.input_tokens:>10} "
            f"{row.output_tokens:>10} {row.seconds:>8.1f}"
        )
    total = sum(r.cost_micros for r in rows) / 1_000_000
    print(f"{'total':<34} {sum(r.calls for r in rows):>7} {total:>12.6f}")
    return 0
