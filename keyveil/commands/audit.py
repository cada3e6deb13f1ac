"""`keyveil audit tail|query|verify`: read the hash-chained audit ledger and check it.

Reads `KEYVEIL_AUDIT_LEDGER` by default (records carry `prev_hash`/`hash`); `--stream`
reads another stream of the same shape, or the raw `KEYVEIL_AUDIT` event stream.
Exit codes: 0 fine, 1 the chain is broken (verify), 2 the bus or stream is unavailable.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import json
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from pydantic import ValidationError

from keyveil.operator import operator_nats
from services.auditor.ledger import (
    GENESIS_HASH,
    LEDGER_STREAM,
    LedgerRecord,
    VerifyResult,
    read_stream,
    verify_chain,
)

__all__ = ["parse_since", "register", "verify_ledger"]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("audit", help="read and verify the tamper-evident audit trail")
    sub = parser.add_subparsers(dest="audit_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--stream", default=LEDGER_STREAM.name, help="stream to read")
        p.add_argument("--json", action="store_true", help="one JSON object per line")

    tail = sub.add_parser("tail", help="the latest records, optionally following new ones")
    tail.add_argument("-n", "--lines", type=int, default=20, help="records to show (20)")
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    common(tail)

    query = sub.add_parser("query", help="records since a time, filtered by type")
    query.add_argument(
        "--since", required=True, help="a duration back from now (30m, 6h, 7d) or an ISO time"
    )
    query.add_argument(
        "--type", action="append", default=[], help="event type or glob (repeatable)"
    )
    query.add_argument("--key-id", help="only records about this key")
    query.add_argument("--outcome", choices=("success", "denied", "failure"))
    query.add_argument("--limit", type=int, default=0, help="stop after this many (0: all)")
    common(query)

    verify = sub.add_parser("verify", help="walk the hash chain; report the first broken link")
    common(verify)

    parser.set_defaults(handler=run)


def parse_since(value: str, *, now: float | None = None) -> float:
    """'30m' / '6h' / '7d' back from now, or an ISO-8601 time (UTC when no zone)."""
    now = time.time() if now is None else now
    match = _DURATION.match(value.strip())
    if match:
        return now - float(match.group(1)) * _UNIT_S[match.group(2)]
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since: {value!r} is neither a duration (30m, 6h, 7d) nor an ISO time"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 0
    except argparse.ArgumentTypeError as exc:
        print(f"keyveil audit: {exc}", file=sys.stderr)
        return 2


async def _run(args: argparse.Namespace) -> int:
    try:
        nc = await operator_nats(Path(args.state_dir))
    except (OSError, nats.errors.Error) as exc:
        print(f"keyveil audit: cannot reach NATS ({type(exc).__name__})", file=sys.stderr)
        return 2
    try:
        js = nc.jetstream()
        if args.audit_command == "verify":
            return await _verify(js, args)
        if args.audit_command == "tail":
            return await _tail(js, args)
        return await _query(js, args)
    except nats.js.errors.NotFoundError:
        print(f"keyveil audit: stream {args.stream} does not exist (yet)", file=sys.stderr)
        return 2
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        print("keyveil audit: JetStream did not answer", file=sys.stderr)
        return 2
    finally:
        await nc.close()


async def verify_ledger(js: JetStreamContext, stream: str) -> VerifyResult:
    """Walk `stream` from its first record; a walk from sequence 1 starts at the genesis hash."""
    info = await js.stream_info(stream)
    anchor = GENESIS_HASH if info.state.first_seq <= 1 else None
    records = [item async for item in read_stream(js, stream)]
    return verify_chain(records, anchor=anchor)


async def _verify(js: JetStreamContext, args: argparse.Namespace) -> int:
    result = await verify_ledger(js, args.stream)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": result.ok,
                    "checked": result.checked,
                    "first_seq": result.first_seq,
                    "last_seq": result.last_seq,
                    "head_hash": result.head_hash,
                    "broken_seq": result.broken.seq if result.broken else None,
                    "reason": result.broken.reason if result.broken else None,
                }
            )
        )
    elif result.broken is None:
        print(
            f"ok: {result.checked} records chained "
            f"(seq {result.first_seq}..{result.last_seq}), head {result.head_hash[:16]}"
        )
    else:
        print(
            f"BROKEN at seq {result.broken.seq}: {result.broken.reason} "
            f"({result.checked} records before it verified)"
        )
    return 0 if result.ok else 1


def _decode(raw: bytes) -> tuple[dict[str, Any], str | None]:
    """(event, record hash) from a ledger record, or (event, None) from a raw audit event."""
    try:
        record = LedgerRecord.model_validate_json(raw)
    except ValidationError:
        try:
            data = json.loads(raw)
        except ValueError:
            return {"type": "<unreadable>"}, None
        return (data if isinstance(data, dict) else {"type": "<unreadable>"}), None
    return record.event, record.hash


def _print(seq: int, raw: bytes, *, as_json: bool) -> None:
    event, digest = _decode(raw)
    if as_json:
        print(json.dumps({"seq": seq, "hash": digest, "event": event}, sort_keys=True))
        return
    ts = event.get("ts")
    when = (
        datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if isinstance(ts, int | float)
        else "?"
    )
    parts = [when, f"seq={seq}", str(event.get("type", "?"))]
    for name in ("actor", "outcome", "key_id", "key_version", "environment"):
        if event.get(name) is not None:
            parts.append(f"{name}={event[name]}")
    if digest:
        parts.append(f"hash={digest[:12]}")
    print("  ".join(parts), flush=True)


async def _tail(js: JetStreamContext, args: argparse.Namespace) -> int:
    info = await js.stream_info(args.stream)
    start = max(info.state.last_seq - max(args.lines, 0) + 1, info.state.first_seq, 1)
    if args.lines <= 0:
        start = info.state.last_seq + 1
    async for seq, raw in read_stream(js, args.stream, start_seq=start, follow=args.follow):
        _print(seq, raw, as_json=args.json)
    return 0


def _matches(event: dict[str, Any], args: argparse.Namespace, since: float) -> bool:
    ts = event.get("ts")
    if isinstance(ts, int | float) and ts < since:
        return False
    if args.type and not any(fnmatch.fnmatchcase(str(event.get("type")), t) for t in args.type):
        return False
    if args.key_id and event.get("key_id") != args.key_id:
        return False
    return not (args.outcome and event.get("outcome") != args.outcome)


async def _query(js: JetStreamContext, args: argparse.Namespace) -> int:
    since = parse_since(args.since)
    shown = 0
    async for seq, raw in read_stream(js, args.stream, start_time=since):
        event, _ = _decode(raw)
        if not _matches(event, args, since):
            continue
        _print(seq, raw, as_json=args.json)
        shown += 1
        if args.limit and shown >= args.limit:
            break
    return 0
