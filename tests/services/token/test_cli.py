"""`keyveil tokens revoke` against real Redis and NATS, as an operator would run it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

import redis.asyncio as aioredis
from nats.aio.client import Client as NATS

from keyveil.servers import ServerProcess
from shared.events import AUDIT_STREAM
from shared.tokens import revoked_key
from tests.support import REPO


async def _cli(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "keyveil.cli",
        "--state-dir",
        str(cwd),
        *args,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


async def test_revoke_writes_redis_and_an_audit_event(
    redis_url: str,
    redis_client: aioredis.Redis,
    private_nats: ServerProcess,
    bus: NATS,
    tmp_path: Path,
) -> None:
    js = bus.jetstream()
    token_id = uuid.uuid4().hex
    env = {"REDIS_URL": redis_url, "NATS_URL": private_nats.url}
    code, out, err = await _cli(
        "tokens", "revoke", token_id, "--ttl", "90", "--reason", "leaked", env=env, cwd=tmp_path
    )
    assert code == 0, err
    assert token_id in out
    assert 80 < await redis_client.ttl(revoked_key(token_id)) <= 90
    stored = await js.get_last_msg(AUDIT_STREAM.name or "", "keyveil.audit.operator")
    event = json.loads(stored.data or b"{}")
    assert (event["type"], event["actor"]) == ("token.revoked", "operator")
    assert event["schema_version"] == 2
    assert event["detail"] == {
        "kind": "token_revoked",
        "via": "cli",
        "token_id": token_id,
        "session_id": None,
        "user": None,
        "ttl_s": 90,
        "reason": "leaked",
    }


async def test_revoke_reads_the_stack_and_refuses_bad_input(
    redis_url: str, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    (tmp_path / "stack.json").write_text(json.dumps({"redis_url": redis_url}))
    token_id = uuid.uuid4().hex
    # No NATS here: the revocation still stands, with a warning about the audit event.
    env = {"REDIS_URL": "", "NATS_URL": "nats://127.0.0.1:1"}
    code, _, err = await _cli("tokens", "revoke", token_id, env=env, cwd=tmp_path)
    assert code == 0
    assert "audit event was not published" in err
    assert 7000 < await redis_client.ttl(revoked_key(token_id)) <= 7200

    code, _, err = await _cli("tokens", "revoke", token_id, "--ttl", "0", env=env, cwd=tmp_path)
    assert code == 2
    assert "--ttl" in err


async def test_revoke_reports_an_unreachable_redis(tmp_path: Path) -> None:
    env = {"REDIS_URL": "redis://127.0.0.1:1/0", "NATS_URL": "nats://127.0.0.1:1"}
    code, _, err = await _cli("tokens", "revoke", "abc", env=env, cwd=tmp_path)
    assert code == 1
    assert "nothing was revoked" in err
