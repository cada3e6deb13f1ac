"""`keyveil keys ...` end to end: a key piped on stdin, listings that never show it."""

from __future__ import annotations

import argparse
import asyncio
import io
import json

import pytest

from keyveil.commands import keys as keys_command
from services.keymanager.app import KeyManager
from tests.services.keymanager.conftest import new_provider_key


def _run(argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    """Run one `keyveil keys` command in a thread (it owns its own event loop)."""
    import contextlib
    import sys

    parser = argparse.ArgumentParser()
    parser.add_argument("--state-dir", default="/nonexistent")
    keys_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = args.handler(args)
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue(), err.getvalue()


async def test_keys_commands(
    keymanager: KeyManager, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NATS_URL", nats_url)
    monkeypatch.delenv("NATS_USER", raising=False)
    key, new = new_provider_key(), new_provider_key()

    code, out, err = await asyncio.to_thread(_run, ["keys", "add"], key + "\n")
    assert code == 0, err
    assert key not in out
    assert key[-4:] in out
    assert "active" in out
    key_id = out.splitlines()[1].split()[0]

    code, out, _ = await asyncio.to_thread(
        _run, ["keys", "rotate", key_id, "--grace-seconds", "30"], new + "\n"
    )
    assert code == 0
    assert "retiring" in out
    assert new not in out

    code, out, _ = await asyncio.to_thread(_run, ["keys", "show", key_id, "--json"])
    shown = json.loads(out)
    assert [(v["version"], v["status"]) for v in shown] == [(2, "active"), (1, "retiring")]
    assert key not in out
    assert new not in out

    code, out, _ = await asyncio.to_thread(_run, ["keys", "revoke", key_id, "--version", "1"])
    assert code == 0
    assert "revoked" in out
    code, out, _ = await asyncio.to_thread(_run, ["keys", "list"])
    assert code == 0
    assert key_id in out
    assert "FINGERPRINT" in out
    code, out, _ = await asyncio.to_thread(_run, ["keys", "rewrap"])
    assert code == 0
    assert "already current 2" in out

    code, _, err = await asyncio.to_thread(_run, ["keys", "add"], "")
    assert code == 2
    assert "no key" in err
    code, _, err = await asyncio.to_thread(_run, ["keys", "add"], key + "\n")
    assert code == 1
    assert "conflict" in err
    assert key not in err
