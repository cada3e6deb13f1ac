"""Helpers for tests that run keyveil services as real processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from keyveil import servers
from keyveil.servers import ServerProcess, free_port, start_nats

REPO = Path(__file__).resolve().parent.parent

# Valid development secrets for tests only (random-looking, never used outside tests).
TEST_KEY_ENCRYPTION_SECRET = "test-kek-9f2Kq7LmX4vN8pR3sT6wY1zB5cD0eG2h"
TEST_PROXY_SIGNING_KEY = "test-psk-Qw3Er5Ty7Ui9Op1As2Df4Gh6Jk8Lz0Xc"
TEST_PROVIDER_KEY = "sk-test-fake-provider-key-0123456789abcdefABCDEF"


async def until(condition: Any, timeout: float = 15.0) -> None:
    """Poll `condition` (sync or async) until true; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@dataclass
class FakeUpstream:
    """The OpenAI-compatible fake, running as its own process."""

    server: ServerProcess

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def calls(self) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.url}/_fake/calls").json()["calls"])

    def clear(self) -> None:
        httpx.delete(f"{self.url}/_fake/calls")

    def behave(self, **behaviour: Any) -> None:
        httpx.post(f"{self.url}/_fake/behaviour", json=behaviour).raise_for_status()


def start_fake_upstream(state_dir: Path) -> FakeUpstream:
    return FakeUpstream(servers.start_fake_upstream(state_dir))


@dataclass
class ServiceProcess:
    """One keyveil service started with `python -m services.<name>`."""

    name: str
    env: dict[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait_ready: bool = True, timeout: float = 30.0) -> ServiceProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "NATS_"))}
        env.update(self.env)
        env["KEYVEIL_PORT"] = str(self.port)
        env.setdefault("LOG_LEVEL", "INFO")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", f"services.{self.name}"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


def key_manager_process(nats_url: str, log_dir: Path) -> ServiceProcess:
    """The real key-manager, bootstrapped with TEST_PROVIDER_KEY (not started yet)."""
    env = {
        "NATS_URL": nats_url,
        "KEY_ENCRYPTION_SECRET": TEST_KEY_ENCRYPTION_SECRET,
        "OPENAI_API_KEY": TEST_PROVIDER_KEY,
    }
    return ServiceProcess("keymanager", env, log_dir / "keymanager.log")


__all__ = [
    "REPO",
    "TEST_KEY_ENCRYPTION_SECRET",
    "TEST_PROVIDER_KEY",
    "TEST_PROXY_SIGNING_KEY",
    "FakeUpstream",
    "ServiceProcess",
    "key_manager_process",
    "start_fake_upstream",
    "start_nats",
]
