"""`keyveil tokens revoke <token_id>`: revoke a proxy token for every proxy replica at once.

`keyveil tokens revoke --user SUB` revokes every live token of one user: the user id is
hashed as the token service hashes it (KEYVEIL_PRINCIPAL_KEY, else PROXY_SIGNING_KEY,
else the local stack's development key) and the time of revocation is stored under
that hash; the proxy refuses the user's tokens issued up to then (`--user-hash` takes
the hash seen in events instead of the id).

The revocation is written to Redis (REDIS_URL, else the local stack's `redis_url`),
where the proxy checks it on every request; an audit event records who did it.
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
from services.token.revocation import revoke_token
from shared.errors import UnavailableError
from shared.eventschema import TokenRevoked
from shared.principals import PrincipalHasher, revoked_user_key

__all__ = ["register"]

# Proxy tokens live at most VOICE_AGENT_TOKEN_DURATION (<= 7200 s): that long is always enough.
_DEFAULT_TTL_S = 7200


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("tokens", help="proxy token operations")
    sub = parser.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    revoke = sub.add_parser("revoke", help="revoke a proxy token by its id, or a user's tokens")
    revoke.add_argument("token_id", nargs="?", help="the token_id the token service returned")
    who = revoke.add_mutually_exclusive_group()
    who.add_argument("--user", metavar="SUB", help="revoke every live token of this user id")
    who.add_argument("--user-hash", metavar="HASH", help="the same, by the hash seen in events")
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
    if args.user or args.user_hash:
        if args.token_id:
            print("keyveil tokens: give a token_id or --user, not both", file=sys.stderr)
            return 2
        return asyncio.run(_revoke_user(args))
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
    store = operator_redis(url)
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


def _user_hash(args: argparse.Namespace) -> str | None:
    if args.user_hash:
        return str(args.user_hash)
    signing_key = os.environ.get("PROXY_SIGNING_KEY")
    if not signing_key:
        dev = Path(args.state_dir) / "dev-secrets.json"
        if dev.exists():
            signing_key = json.loads(dev.read_text()).get("PROXY_SIGNING_KEY")
    principal_key = os.environ.get("KEYVEIL_PRINCIPAL_KEY")
    if not (principal_key or signing_key):
        return None
    hasher = PrincipalHasher.from_secrets(
        principal_key=principal_key, signing_key=signing_key or ""
    )
    return hasher.hash(str(args.user))


async def _revoke_user(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    sub_hash = _user_hash(args)
    if sub_hash is None or not 1 <= len(sub_hash) <= 128:
        print(
            "keyveil tokens: set KEYVEIL_PRINCIPAL_KEY or PROXY_SIGNING_KEY as the token "
            "service has them (or pass --user-hash)",
            file=sys.stderr,
        )
        return 2
    url = os.environ.get("REDIS_URL") or load_stack(state_dir).get("redis_url")
    if not url:
        print("keyveil tokens: set REDIS_URL (or run `keyveil up`)", file=sys.stderr)
        return 2
    store = operator_redis(url)
    try:
        await store.set(revoked_user_key(sub_hash), str(int(time.time())), ex=args.ttl)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
        print("keyveil tokens: Redis is unreachable; nothing was revoked", file=sys.stderr)
        return 1
    finally:
        await store.aclose()
    print(f"revoked every token of user {sub_hash} issued until now")
    if not await _audit(state_dir, args, user=sub_hash):
        print(
            "keyveil tokens: warning: the revocation stands, but its audit event was not "
            "published (NATS unreachable or publishing not permitted)",
            file=sys.stderr,
        )
    return 0


async def _audit(state_dir: Path, args: argparse.Namespace, user: str | None = None) -> bool:
    return await publish_operator_audit(state_dir, "token.revoked", detail_for(args, user))


def detail_for(args: argparse.Namespace, user: str | None) -> TokenRevoked:
    """The audit detail: the token id or the user hash (never the raw user id)."""
    return TokenRevoked(
        via="cli",
        token_id=None if user else args.token_id,
        user=user,
        ttl_s=args.ttl,
        reason=args.reason[:512] if args.reason else None,
    )
