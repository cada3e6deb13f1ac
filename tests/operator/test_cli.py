"""Every `keyveil` failure is one line and a non-zero exit, never a traceback (unless --debug)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis as sync_redis

from keyveil.commands.keys import _print_table
from keyveil.servers import bootstrap_nats, free_port, start_nats
from shared.events import AlertEvent
from shared.ratelimit import block_key, strikes_key
from tests.support import REPO

KEYVEIL = (sys.executable, "-m", "keyveil.cli")


def keyveil(
    *argv: str, state_dir: Path, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "REDIS_"))}
    return subprocess.run(
        [*KEYVEIL, "--state-dir", str(state_dir), *argv],
        env={**base, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_failure(done: subprocess.CompletedProcess[str], code: int, prefix: str) -> str:
    """The whole of stderr: exactly one line starting with `prefix`, and the exit code."""
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stdout + done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(prefix), lines[0]
    assert done.returncode == code, (done.returncode, done.stderr)
    return lines[0]


def test_version(tmp_path: Path) -> None:
    done = keyveil("--version", state_dir=tmp_path)
    assert done.returncode == 0
    assert done.stdout.startswith("keyveil 0.")


def test_keys_list_without_a_stack_is_one_line(tmp_path: Path) -> None:
    closed = f"nats://127.0.0.1:{free_port()}"
    done = keyveil("keys", "list", state_dir=tmp_path, NATS_URL=closed)
    line = one_line_failure(done, 3, "keyveil keys: cannot reach NATS")
    assert "NATS_URL" in line


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    closed = f"nats://127.0.0.1:{free_port()}"
    done = keyveil("keys", "list", "--debug", state_dir=tmp_path, NATS_URL=closed)
    assert done.returncode != 0
    assert "Traceback" in done.stderr


def test_a_bad_key_id_names_the_field_not_a_pydantic_dump(nats_url: str, tmp_path: Path) -> None:
    done = keyveil("keys", "show", "not-a-key<script>", state_dir=tmp_path, NATS_URL=nats_url)
    line = one_line_failure(done, 2, "keyveil keys: invalid key_id")
    assert "<script>" not in line
    assert "pydantic" not in line


def test_an_empty_key_listing_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    _print_table([])
    assert capsys.readouterr().out.strip() == "no keys matched"


def test_blocks_list_and_unblock(redis_url: str, tmp_path: Path) -> None:
    store = sync_redis.Redis.from_url(redis_url)
    try:
        store.set(block_key("192.0.2.7"), "1", px=120_000)
        store.set(strikes_key("192.0.2.8"), "4", px=60_000)
        listing = keyveil("blocks", "list", state_dir=tmp_path, REDIS_URL=redis_url)
        assert listing.returncode == 0, listing.stderr
        header, *rows = listing.stdout.strip().splitlines()
        assert header.split() == ["IP", "BLOCKED", "UNBLOCKS", "IN", "STRIKES"]
        blocked = next(r for r in rows if r.startswith("192.0.2.7"))
        assert blocked.split()[1] == "yes"
        striking = next(r for r in rows if r.startswith("192.0.2.8"))
        assert striking.split()[1:] == ["no", "-", "4"]

        as_json = keyveil("blocks", "list", "--json", state_dir=tmp_path, REDIS_URL=redis_url)
        found = {row["ip"]: row for row in json.loads(as_json.stdout)}
        assert found["192.0.2.7"]["blocked"] is True
        assert 0 < found["192.0.2.7"]["unblocks_in_s"] <= 120

        lifted = keyveil("blocks", "unblock", "192.0.2.7", state_dir=tmp_path, REDIS_URL=redis_url)
        assert (lifted.returncode, lifted.stdout.strip()) == (0, "unblocked 192.0.2.7")
        assert store.exists(block_key("192.0.2.7")) == 0

        again = keyveil("blocks", "unblock", "192.0.2.7", state_dir=tmp_path, REDIS_URL=redis_url)
        one_line_failure(again, 1, "keyveil blocks: nothing matched: 192.0.2.7 is not blocked")
        bad = keyveil("blocks", "unblock", "192.0.2.300", state_dir=tmp_path, REDIS_URL=redis_url)
        one_line_failure(bad, 2, "keyveil blocks: IP must be an IPv4 or IPv6 address")
    finally:
        store.delete(block_key("192.0.2.7"), strikes_key("192.0.2.8"))
        store.close()
    empty = keyveil("blocks", "list", state_dir=tmp_path, REDIS_URL=redis_url)
    assert "192.0.2." not in empty.stdout


def test_blocks_without_redis_is_one_line(tmp_path: Path) -> None:
    missing = keyveil("blocks", "list", state_dir=tmp_path, REDIS_URL="")
    one_line_failure(missing, 2, "keyveil blocks: set REDIS_URL")
    closed = f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0"
    down = keyveil("blocks", "list", state_dir=tmp_path, REDIS_URL=closed)
    line = one_line_failure(down, 3, "keyveil blocks: Redis is unreachable")
    assert "hunter2" not in line


def test_alerts_tail_follow_waits_for_the_stream(tmp_path: Path) -> None:
    bare = start_nats(tmp_path / "bare")  # not bootstrapped yet: no alerts stream
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "REDIS_"))}
    follower = subprocess.Popen(
        [*KEYVEIL, "--state-dir", str(tmp_path), "alerts", "tail", "-f"],
        env={**base, "NATS_URL": bare.url},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert follower.stderr is not None
        assert follower.stdout is not None
        waiting = follower.stderr.readline()
        assert "waiting for the KEYVEIL_ALERTS stream" in waiting
        time.sleep(1.5)
        assert follower.poll() is None  # still waiting, not exited
        bootstrap_nats(bare.url)
        alert = AlertEvent(service="auditor", type="replay_attempts", summary="3 replays for t")
        _publish(bare.url, alert)
        deadline = time.monotonic() + 30
        seen = ""
        while "replay_attempts" not in seen and time.monotonic() < deadline:
            seen += follower.stdout.readline()
        assert "replay_attempts" in seen
        assert "3 replays for t" in seen
    finally:
        follower.terminate()
        follower.wait(10)
        for stream in (follower.stdout, follower.stderr):
            if stream is not None:
                stream.close()
        bare.stop()


def _publish(url: str, alert: AlertEvent) -> None:
    import asyncio

    import nats

    async def send() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().publish(alert.subject, alert.model_dump_json().encode())
        finally:
            await nc.close()

    asyncio.run(send())
