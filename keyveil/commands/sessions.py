"""`keyveil sessions list|show|close`: the brokered voice sessions every proxy replica holds.

They read the voice registry in Redis (REDIS_URL, else the local stack's `redis_url`;
see `shared.voicesessions`). `close` writes a close request that the replica holding the
session's sideband acts on within about a second (`session.close` or a call hangup),
then waits, by default up to 5 s, to report how the session ended; an audit event
records who asked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import redis.exceptions

from keyveil.operator import load_stack, operator_redis, publish_operator_audit
from shared.eventschema import VoiceCloseRequested
from shared.voicesessions import VoiceRegistry, VoiceSession

__all__ = ["register"]

_REDIS_TROUBLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("sessions", help="brokered voice sessions")
    sub = parser.add_subparsers(dest="sessions_command", required=True, metavar="ACTION")
    listing = sub.add_parser("list", help="live voice sessions")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = sub.add_parser("show", help="one session's record")
    show.add_argument("session_id")
    close = sub.add_parser("close", help="end a live session now")
    close.add_argument("session_id")
    close.add_argument("--reason", default="", help="why, for the audit trail")
    close.add_argument(
        "--wait", type=float, default=5.0, help="seconds to wait for the end (0: do not wait)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    url = os.environ.get("REDIS_URL") or load_stack(state_dir).get("redis_url")
    if not url:
        print(
            "keyveil sessions: set REDIS_URL (or run `keyveil up` so stack.json names one)",
            file=sys.stderr,
        )
        return 2
    session_id = getattr(args, "session_id", None)
    if session_id is not None and not 1 <= len(session_id) <= 128:
        print("keyveil sessions: session_id must be 1 to 128 characters", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args, url, state_dir))
    except _REDIS_TROUBLE:
        print("keyveil sessions: Redis is unreachable", file=sys.stderr)
        return 1


def _summary(record: VoiceSession, owner: str | None) -> dict[str, Any]:
    return {
        "id": record.id,
        "api": record.api,
        "status": record.status,
        "model": record.model,
        "voice": record.voice,
        "token_id": record.token_id,
        "age_s": round(time.time() - record.started_at, 1),
        "ends_in_s": round(record.ends_at - time.time(), 1),
        "billed_s": record.billed_s,
        "tokens": record.tokens,
        "attachments": record.attachments,
        "owner": owner,
    }


async def _run(args: argparse.Namespace, url: str, state_dir: Path) -> int:
    store = operator_redis(url)
    try:
        registry = VoiceRegistry(store)
        if args.sessions_command == "list":
            return await _list(registry, as_json=args.json)
        if args.sessions_command == "show":
            return await _show(registry, args.session_id)
        return await _close(registry, args, state_dir)
    finally:
        await store.aclose()


async def _list(registry: VoiceRegistry, *, as_json: bool) -> int:
    rows = []
    for session_id in await registry.live_ids():
        record = await registry.get(session_id)
        if record is not None:
            rows.append(_summary(record, await registry.owner(session_id)))
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'ID':<40} {'API':<9} {'STATUS':<8} {'MODEL':<18} {'AGE_S':>8} {'BILLED_S':>9}")
    for row in rows:
        print(
            f"{row['id']:<40} {row['api']:<9} {row['status']:<8} {row['model']:<18} "
            f"{row['age_s']:>8} {row['billed_s']:>9}"
        )
    print(f"{len(rows)} live session(s)")
    return 0


async def _show(registry: VoiceRegistry, session_id: str) -> int:
    record = await registry.get(session_id)
    if record is None:
        print(f"keyveil sessions: no session {session_id}", file=sys.stderr)
        return 1
    shown = {**_summary(record, await registry.owner(session_id)), "pinned": record.pinned}
    shown.update(closed_reason=record.closed_reason, closed_at=record.closed_at)
    print(json.dumps(shown, indent=2))
    return 0


async def _close(registry: VoiceRegistry, args: argparse.Namespace, state_dir: Path) -> int:
    if not await registry.request_close(args.session_id, args.reason or "operator"):
        print(f"keyveil sessions: no live session {args.session_id}", file=sys.stderr)
        return 1
    if not await _audit(state_dir, args):
        print(
            "keyveil sessions: warning: the close request stands, but its audit event was "
            "not published (NATS unreachable or publishing not permitted)",
            file=sys.stderr,
        )
    deadline = time.monotonic() + max(0.0, args.wait)
    while time.monotonic() < deadline:
        record = await registry.get(args.session_id)
        if record is not None and record.status == "closed":
            print(f"closed {args.session_id} ({record.closed_reason})")
            return 0
        await asyncio.sleep(0.1)
    if args.wait:
        print(f"close requested for {args.session_id}; it has not ended yet", file=sys.stderr)
        return 1
    print(f"close requested for {args.session_id}")
    return 0


async def _audit(state_dir: Path, args: argparse.Namespace) -> bool:
    detail = VoiceCloseRequested(
        voice_session_id=args.session_id, reason=args.reason[:512] if args.reason else None
    )
    return await publish_operator_audit(state_dir, "voice.session.close_requested", detail)
