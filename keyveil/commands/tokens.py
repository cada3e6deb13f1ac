"""`keyveil tokens revoke <token_id>`: revoke a proxy token for every proxy replica at once.

The revocation is written to Redis (REDIS_URL, else the local stack's `redis_url`),
where the proxy checks it on every request; an audit event records who did it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import nats.errors

from keyveil.operator import load_stack, operator_nats
from services.token.revocation import revoke_token
from shared.errors import UnavailableError
from shared.events import AUDIT_STREAM, AuditEvent
from shared.ratelimit import redis_client

__all__ = ["register"]

# Proxy tokens live at most VOICE_AGENT_TOKEN_DURATION (<= 7200 s): that long is always enough.
_DEFAULT_TTL_S = 7200


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("tokens", help="proxy token operations")
    sub = parser.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    revoke = sub.add_parser("revoke", help="revoke a proxy token by its id")
    revoke.add_argument("token_id", help="the token_id the token service returned")
    revoke.add_argument(
        "--ttl",
        type=int,
        default=_DEFAULT_TTL_S,
        help=f"seconds to keep the revocation (default {_DEFAULT_TTL_S}, the longest token life)",
    )
    revoke.add_argument("--reason", default="", help="why, for the audit trail")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.ttl <= 86_400:
        print("keyveil tokens: --ttl must be between 1 and 86400 seconds", file=sys.stderr)
        return 2
    if not args.token_id or len(args.token_id) > 128:
        print("keyveil tokens: token_id must be 1 to 128 characters", file=sys.stderr)
        return 2
    return asyncio.run(_revoke(args))


async def _revoke(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    url = os.environ.get("REDIS_URL") or load_stack(state_dir).get("redis_url")
    if not url:
        print(
            "keyveil tokens: set REDIS_URL (or run `keyveil up` so stack.json names one)",
            file=sys.stderr,
        )
        return 2
    store = redis_client(url, timeout_s=3.0)
    try:
        await revoke_token(store, args.token_id, args.ttl)
    except UnavailableError:
        print("keyveil tokens: Redis is unreachable; nothing was revoked", file=sys.stderr)
        return 1
    finally:
        await store.aclose()
    print(f"revoked {args.token_id} for {args.ttl}s")
    if not await _audit(state_dir, args):
        print(
            "keyveil tokens: warning: the revocation stands, but its audit event was not "
            "published (NATS unreachable or publishing not permitted)",
            file=sys.stderr,
        )
    return 0


async def _audit(state_dir: Path, args: argparse.Namespace) -> bool:
    event = AuditEvent(
        service="operator",
        type="token.revoked",
        actor="operator",
        detail={"token_id": args.token_id, "ttl_s": args.ttl, "via": "cli", "reason": args.reason},
    )
    try:
        nc = await operator_nats(state_dir)
    except (OSError, nats.errors.Error):
        return False
    try:
        await nc.jetstream().publish(
            event.subject,
            event.model_dump_json().encode(),
            stream=AUDIT_STREAM.name,
            timeout=3.0,
            headers={"Nats-Msg-Id": event.event_id},
        )
    except (OSError, nats.errors.Error):
        return False
    finally:
        await nc.close()
    return True
