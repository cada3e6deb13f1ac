"""`keyveil alerts tail`: the latest anomaly alerts from `KEYVEIL_ALERTS`, optionally live."""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from pydantic import ValidationError

from keyveil.operator import operator_nats
from services.auditor.ledger import read_stream
from shared.events import ALERTS_STREAM, AlertEvent

__all__ = ["format_alert", "register"]

_RANK = {"info": 0, "warning": 1, "critical": 2}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("alerts", help="anomaly alerts raised by the auditor")
    sub = parser.add_subparsers(dest="alerts_command", required=True, metavar="ACTION")
    tail = sub.add_parser("tail", help="the latest alerts, optionally following new ones")
    tail.add_argument("-n", "--lines", type=int, default=20, help="alerts to show (20)")
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new alerts")
    tail.add_argument("--type", action="append", default=[], help="alert type or glob")
    tail.add_argument(
        "--severity", choices=tuple(_RANK), default="info", help="minimum severity (info)"
    )
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.set_defaults(handler=run)


def format_alert(alert: AlertEvent) -> str:
    when = datetime.fromtimestamp(alert.ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    labels = " ".join(f"{k}={v}" for k, v in sorted(alert.labels.items()) if k != "observed_at")
    return f"{when}  {alert.severity.upper():8}  {alert.type}  {alert.summary}  {labels}".rstrip()


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_tail(args))
    except KeyboardInterrupt:
        return 0


def _wanted(alert: AlertEvent, args: argparse.Namespace) -> bool:
    if _RANK[alert.severity] < _RANK[args.severity]:
        return False
    return not args.type or any(fnmatch.fnmatchcase(alert.type, t) for t in args.type)


async def _stream_info(js: Any, stream: str, *, wait: bool) -> Any:
    """The stream's info; with `wait`, poll until bootstrap or the auditor creates it."""
    announced = False
    while True:
        try:
            return await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            if not wait:
                raise
            if not announced:
                print(f"keyveil alerts: waiting for the {stream} stream...", file=sys.stderr)
                announced = True
            await asyncio.sleep(1.0)


async def _tail(args: argparse.Namespace) -> int:
    try:
        nc = await operator_nats(Path(args.state_dir))
    except (OSError, nats.errors.Error) as exc:
        print(f"keyveil alerts: cannot reach NATS ({type(exc).__name__})", file=sys.stderr)
        return 3
    stream = ALERTS_STREAM.name or "KEYVEIL_ALERTS"
    try:
        js = nc.jetstream()
        info = await _stream_info(js, stream, wait=args.follow)
        # Filters apply after reading, so read back further than -n to fill the page.
        lookback = args.lines * (20 if args.type or args.severity != "info" else 1)
        start = max(info.state.last_seq - lookback + 1, info.state.first_seq, 1)
        recent: list[AlertEvent] = []
        if info.state.messages:
            async for _, raw in read_stream(js, stream, start_seq=start):
                try:
                    alert = AlertEvent.model_validate_json(raw)
                except ValidationError:
                    continue
                if _wanted(alert, args):
                    recent.append(alert)
        shown = recent[-args.lines :] if args.lines > 0 else []
        for alert in shown:
            _print(alert, as_json=args.json)
        if not shown and not args.json:
            print("no alerts matched" + ("; waiting for new ones" if args.follow else ""))
        if args.follow:
            async for _, raw in read_stream(
                js, stream, start_seq=info.state.last_seq + 1, follow=True
            ):
                try:
                    alert = AlertEvent.model_validate_json(raw)
                except ValidationError:
                    continue
                if _wanted(alert, args):
                    _print(alert, as_json=args.json)
    except nats.js.errors.NotFoundError:
        print(
            f"keyveil alerts: no alerts stream ({stream}) yet; run `keyveil bootstrap` (-f waits)",
            file=sys.stderr,
        )
        return 2
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        print("keyveil alerts: JetStream did not answer", file=sys.stderr)
        return 3
    finally:
        await nc.close()
    return 0


def _print(alert: AlertEvent, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(alert.model_dump(mode="json"), sort_keys=True), flush=True)
    else:
        print(format_alert(alert), flush=True)
