"""`keyveil keys ...` end to end: a key piped on stdin, listings that never show it."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
from pathlib import Path

import pytest

from keyveil.commands import keys as keys_command
from services.keymanager.app import KeyManager
from tests.services.keymanager.conftest import KeyManagerFactory, new_provider_key


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


async def test_keys_doctor_backup_restore(
    nats_url: str,
    monkeypatch: pytest.MonkeyPatch,
    start_keymanager: KeyManagerFactory,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("NATS_URL", nats_url)
    monkeypatch.delenv("NATS_USER", raising=False)
    manager = await start_keymanager()
    bucket = manager.settings.kv_bucket
    key = new_provider_key()
    code, _, err = await asyncio.to_thread(_run, ["keys", "add"], key + "\n")
    assert code == 0, err

    code, out, err = await asyncio.to_thread(_run, ["keys", "doctor"])
    assert code == 0, err
    assert out.startswith("OK: custody record opens under kek-")
    assert "KEK provider: local" in out

    backup = tmp_path / "keys.json"
    code, out, err = await asyncio.to_thread(_run, ["keys", "backup", str(backup)])
    assert code == 0, err
    assert "backed up 1 record" in out
    assert oct(backup.stat().st_mode & 0o777) == "0o600"
    assert key not in backup.read_text()

    tampered = tmp_path / "tampered.json"
    document = json.loads(backup.read_text())
    document["records"][0]["last4"] = "XXXX"
    tampered.write_text(json.dumps(document))
    code, _, err = await asyncio.to_thread(_run, ["keys", "restore", str(tampered)])
    assert code == 1
    assert "bad_backup_signature" in err

    code, out, err = await asyncio.to_thread(_run, ["keys", "restore", str(backup)])
    assert code == 0, err
    assert "restored 0, already present 1" in out

    # A key-manager with the wrong KEK: doctor says what is wrong and exits non-zero.
    await manager.stop()
    await start_keymanager(
        KEYMANAGER_KV_BUCKET=bucket, KEY_ENCRYPTION_SECRET="wrong-kek-Qm4Xz8Lp2Vr6Tn0Wy3Kc7Hs1"
    )
    code, out, err = await asyncio.to_thread(_run, ["keys", "doctor"])
    assert code == 1
    assert out.startswith("PROBLEM: the custody record is wrapped under kek-")
    assert "KEY_ENCRYPTION_SECRET_PREVIOUS" in out
