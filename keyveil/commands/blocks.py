"""`keyveil blocks list|unblock IP`: the client IPs the token service has blocked.

Repeated auth failures or limit hits block an IP for RATE_LIMIT_BLOCK_FOR_S
(shared/ratelimit.py); a developer who locks out localhost lifts it here instead of
deleting Redis keys by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from keyveil.operator import CommandError, operator_redis, print_table, redis_url
from shared.ratelimit import block_key, strikes_key

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("blocks", help="list or lift client IP blocks")
    sub = parser.add_subparsers(dest="blocks_command", required=True, metavar="ACTION")
    listing = sub.add_parser("list", help="blocked IPs and IPs collecting strikes")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_run(_list))
    unblock = sub.add_parser("unblock", help="lift the block (and the strikes) of one IP")
    unblock.add_argument("ip", help="the client IP address")
    unblock.add_argument("--json", action="store_true")
    unblock.set_defaults(handler=_run(_unblock))


def _run(operation: Any) -> Any:
    def handler(args: argparse.Namespace) -> int:
        code: int = asyncio.run(operation(args))
        return code

    return handler


def _prefix(make_key: Any) -> str:
    # Keys end with the IP as a hash tag: "kv:block:{203.0.113.7}".
    return str(make_key("")).removesuffix("{}")


async def _list(args: argparse.Namespace) -> int:
    store = operator_redis(redis_url(Path(args.state_dir)))
    try:
        rows: dict[str, dict[str, Any]] = {}
        for kind, make_key in (("blocked", block_key), ("strikes", strikes_key)):
            prefix = _prefix(make_key)
            async for raw in store.scan_iter(match=f"{prefix}*", count=500):
                key = raw.decode() if isinstance(raw, bytes) else str(raw)
                ip = key.removeprefix(prefix).removeprefix("{").removesuffix("}")
                entry = rows.setdefault(ip, {"ip": ip, "blocked": False, "strikes": 0})
                ttl_ms = int(await store.pttl(key))
                if kind == "blocked":
                    entry.update(blocked=True, unblocks_in_s=max(ttl_ms, 0) / 1000)
                else:
                    value = await store.get(key)
                    entry["strikes"] = int(value or 0)
    except RedisError as exc:
        raise CommandError(f"Redis is unreachable ({type(exc).__name__})", 3) from None
    finally:
        await store.aclose()
    found = sorted(rows.values(), key=lambda r: (not r["blocked"], r["ip"]))
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    print_table(
        ("IP", "BLOCKED", "UNBLOCKS IN", "STRIKES"),
        (
            (
                r["ip"],
                "yes" if r["blocked"] else "no",
                f"{r['unblocks_in_s']:.0f}s" if r["blocked"] else "-",
                str(r["strikes"]),
            )
            for r in found
        ),
        empty="no blocked IPs and no strikes",
    )
    return 0


async def _unblock(args: argparse.Namespace) -> int:
    try:
        ip = str(ipaddress.ip_address(args.ip))
    except ValueError:
        raise CommandError("IP must be an IPv4 or IPv6 address", 2) from None
    store = operator_redis(redis_url(Path(args.state_dir)))
    try:
        removed = int(await store.delete(block_key(ip), strikes_key(ip)))
    except RedisError as exc:
        raise CommandError(f"Redis is unreachable ({type(exc).__name__})", 3) from None
    finally:
        await store.aclose()
    if args.json:
        print(json.dumps({"ip": ip, "unblocked": bool(removed)}))
    if not removed:
        raise CommandError(f"nothing matched: {ip} is not blocked and has no strikes", 1)
    if not args.json:
        print(f"unblocked {ip}")
    return 0
