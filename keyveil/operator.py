"""How operator commands reach the running system: stack.json and the operator credential."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS

from shared.bus import server_urls

__all__ = ["load_stack", "operator_nats"]


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
    return await nats.connect(**options, max_reconnect_attempts=2)
