"""The whole system as `keyveil up --fake-upstream` runs it: real processes, real servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import REPO, TEST_PROVIDER_KEY

ORIGIN = "http://localhost:5173"


class Stack:
    """A running `keyveil up` and what its stack.json says."""

    def __init__(self, state_dir: Path, process: subprocess.Popen[bytes]) -> None:
        self.state_dir = state_dir
        self.process = process

    @property
    def info(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.state_dir / "stack.json").read_text())
        return data

    def url(self, name: str) -> str:
        return str(self.info[f"{name}_url"])

    def pid(self, name: str) -> int:
        return int(self.info["pids"][name])

    def wait_ready(self, name: str, *, timeout: float = 30.0, old_pid: int | None = None) -> float:
        """Seconds until `name` (restarted if `old_pid` is given) answers /readyz."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            try:
                if old_pid is None or self.pid(name) != old_pid:
                    url = self.info["metrics_urls"][name].removesuffix("/metrics")
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        return time.monotonic() - started
            except (httpx.HTTPError, KeyError, ValueError, OSError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{name} not ready within {timeout}s")


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state_dir = tmp_path_factory.mktemp("stack")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "NATS_", "REDIS_", "KEY_ENCRYPTION", "PROXY_SIGNING"))
    }
    env.update(OPENAI_API_KEY=TEST_PROVIDER_KEY, ALLOWED_ORIGINS=ORIGIN, NODE_ENV="development")
    log = (state_dir / "up.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keyveil.cli",
            "up",
            "--fake-upstream",
            "--base-port",
            "0",
            "--state-dir",
            str(state_dir),
        ],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    stack = Stack(state_dir, process)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError((state_dir / "up.log").read_text())
        try:
            if stack.info.get("ready"):
                break
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.2)
    else:
        process.kill()
        raise TimeoutError("keyveil up not ready:\n" + (state_dir / "up.log").read_text()[-4000:])
    yield stack
    process.send_signal(signal.SIGINT)
    try:
        process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
