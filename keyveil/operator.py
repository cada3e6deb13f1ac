"""How operator commands reach the running system: stack.json and the operator credential."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import nats.errors
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from shared.bus import server_urls
from shared.redistopology import RedisTopology, connect

if TYPE_CHECKING:
    from shared.eventschema import AuditDetail

__all__ = [
    "CommandError",
    "load_stack",
    "operator_nats",
    "operator_redis",
    "print_table",
    "redis_url",
]


class CommandError(Exception):
    """A command failed for a reason the operator can act on; `keyveil` prints the message."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def load_stack(state_dir: Path) -> dict[str, Any]:
    """The stack.json `keyveil up` wrote, or an empty dict when none runs here."""
    path = state_dir / "stack.json"
    if not path.exists():
        return {}
    data: dict[str, Any] = json.loads(path.read_text())
    return data


async def operator_nats(state_dir: Path, *, role: str = "operator") -> NATS:
    """Connect as `role` (operator, or bootstrap for stream set-up): NATS_URL/NATS_USER/
    NATS_PASSWORD, else the local stack's credential for that role."""
    stack = load_stack(state_dir)
    url = os.environ.get("NATS_URL") or stack.get("nats_url") or "nats://127.0.0.1:4222"
    user = os.environ.get("NATS_USER")
    password = os.environ.get("NATS_PASSWORD")
    credential = stack.get(f"{role}_credential")
    if not user and credential and Path(credential).exists():
        creds = json.loads(Path(credential).read_text())
        user, password = creds["user"], creds["password"]
    options: dict[str, Any] = {
        "servers": server_urls(url),
        "name": "keyveil-operator",
        "connect_timeout": 3,
    }
    if user:
        options.update(user=user, password=password or "", inbox_prefix=f"_INBOX_{user}".encode())
    # nats-py logs each failed attempt with a traceback; the CLI reports one line instead.
    return await nats.connect(**options, max_reconnect_attempts=2, error_cb=_quiet)


async def _quiet(_: Exception) -> None:
    return None


def redis_url(state_dir: Path) -> str:
    """REDIS_URL, else the local stack's; a one-line failure when neither exists."""
    url = os.environ.get("REDIS_URL") or load_stack(state_dir).get("redis_url")
    if not url:
        raise CommandError("set REDIS_URL (or run `keyveil up` so stack.json names one)", 2)
    return str(url)


def operator_redis(url: str) -> aioredis.Redis:
    """A client for `url` in the topology REDIS_SENTINELS / REDIS_CLUSTER describe."""
    try:
        topology = RedisTopology.from_environ(os.environ, url=url)
    except ValueError as exc:
        raise CommandError(f"Redis topology: {exc}", 2) from None
    return connect(topology)


def print_table(header: Sequence[str], rows: Iterable[Sequence[str]], *, empty: str) -> None:
    """Aligned columns under a header, or `empty` when there are no rows."""
    table = [tuple(header), *(tuple(row) for row in rows)]
    if len(table) == 1:
        print(empty)
        return
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    for row in table:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


async def publish_operator_audit(state_dir: Path, event_type: str, detail: AuditDetail) -> bool:
    """Record an operator action on `keyveil.audit.operator`; False when it could not be."""
    from shared.events import AUDIT_STREAM, AuditEvent

    event = AuditEvent(service="operator", type=event_type, actor="operator", detail=detail)
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
