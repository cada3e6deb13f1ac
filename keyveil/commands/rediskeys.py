"""`keyveil redis migrate`: rename keys written before the Cluster hash tags.

Earlier versions named keys without braces (`kv:revoked:<jti>`); this version reads
`kv:revoked:{<jti>}` (docs/redis.md). Revocations, user revocations, IP blocks and strikes
still in force are carried over with RENAME (which keeps the TTL); rate-limit state is
not worth carrying (the limits restart). Run it once against a standalone or Sentinel
Redis before (or right after) the upgrade; `--dry-run` counts without renaming.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from keyveil.operator import CommandError, operator_redis, redis_url
from shared.principals import revoked_user_key
from shared.ratelimit import block_key, strikes_key
from shared.redistopology import cluster_of
from shared.tokens import revoked_key

__all__ = ["migrate_untagged_keys", "register"]

# The key builders whose subject moved into a hash tag, and the old prefix of each.
_MOVED: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("kv:revoked:", revoked_key),
    ("kv:revoked-user:", revoked_user_key),
    ("kv:block:", block_key),
    ("kv:strikes:", strikes_key),
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("redis", help="Redis keyspace maintenance")
    sub = parser.add_subparsers(dest="redis_command", required=True, metavar="ACTION")
    migrate = sub.add_parser("migrate", help="rename keys of earlier versions (hash tags)")
    migrate.add_argument("--dry-run", action="store_true", help="count, rename nothing")
    migrate.add_argument("--json", action="store_true")
    migrate.set_defaults(handler=_handler)


def _handler(args: argparse.Namespace) -> int:
    code: int = asyncio.run(_migrate(args))
    return code


async def migrate_untagged_keys(store: aioredis.Redis, *, dry_run: bool = False) -> dict[str, int]:
    """Rename every untagged revocation, block and strike key; counts per old prefix."""
    counts: dict[str, int] = {}
    for prefix, make_key in _MOVED:
        moved = 0
        async for raw in store.scan_iter(match=f"{prefix}*", count=500):
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            subject = key.removeprefix(prefix)
            if subject.startswith("{"):
                continue  # already tagged
            if not dry_run:
                # RENAMENX: a tagged key written since the upgrade wins.
                await store.renamenx(key, make_key(subject))
            moved += 1
        counts[prefix] = moved
    return counts


async def _migrate(args: argparse.Namespace) -> int:
    store = operator_redis(redis_url(Path(args.state_dir)))
    try:
        if cluster_of(store) is not None:
            raise CommandError("a cluster holds no keys of earlier versions: nothing to do", 1)
        counts = await migrate_untagged_keys(store, dry_run=args.dry_run)
    except RedisError as exc:
        raise CommandError(f"Redis is unreachable ({type(exc).__name__})", 3) from None
    finally:
        await store.aclose()
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "keys": counts}))
    else:
        verb = "would rename" if args.dry_run else "renamed"
        for prefix, moved in counts.items():
            print(f"{verb} {moved} {prefix}* key(s)")
    return 0
