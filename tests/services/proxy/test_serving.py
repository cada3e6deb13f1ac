"""shared/serving.py: the proxy under granian, and several workers on one port.

Demo mode keeps the upstream and the key manager out of it: what is under test is the
serving (lifespan, one port for N workers, one /metrics for all of them, shutdown).
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from keyveil.servers import ServerProcess
from tests.support import FakeUpstream, ServiceProcess

from .conftest import CHAT, Browser, chat_body, proxy_env

pytestmark = pytest.mark.slow


def _instances(url: str, tries: int = 200) -> set[str]:
    """The worker processes that answer on `url`, one fresh connection per probe."""
    seen: set[str] = set()
    for _ in range(tries):
        with httpx.Client(timeout=5) as client:  # a new connection: the kernel picks again
            seen.add(client.get(f"{url}/healthz").json()["instance"])
        if len(seen) > 1:
            break
    return seen


def _requests_total(text: str) -> float:
    found = re.findall(r'keyveil_proxy_requests_total\{[^}]*status_class="2xx"[^}]*\} (\S+)', text)
    return sum(float(value) for value in found)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _wait_exit(service: ServiceProcess, timeout: float = 20.0) -> int:
    assert service.process is not None
    return service.process.wait(timeout)


async def test_workers_share_one_port_and_one_metrics_view(
    proxy_nats: ServerProcess, redis_url: str, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    env = proxy_env(
        proxy_nats.url,
        redis_url,
        fake_upstream,
        VOICE_AGENT_DEMO_MODE="true",
        KEYVEIL_WORKERS="2",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"),
    )
    service = ServiceProcess("proxy", env, tmp_path / "proxy.log").start(timeout=60)
    try:
        seen = _instances(service.url)
        assert len(seen) == 2, f"one port, two workers answering: {seen}"
        pids = [int(instance.rpartition(":")[2]) for instance in seen]
        assert service.process is not None
        assert service.process.pid not in pids  # the supervisor serves nothing itself
        for _ in range(6):  # a browser each: new connections, spread over the workers
            browser = Browser(service.url)
            try:
                assert (await browser.post(CHAT, chat_body())).status_code == 200
            finally:
                await browser.close()
        for _ in range(10):  # whichever worker answers the scrape counts all six
            with httpx.Client(timeout=5) as client:
                assert _requests_total(client.get(f"{service.url}/metrics").text) == 6.0
        service.process.send_signal(signal.SIGTERM)
        assert _wait_exit(service) == 0
        assert all(_gone(pid) for pid in pids)
    finally:
        service.stop()


async def test_a_dead_worker_stops_the_pod(
    proxy_nats: ServerProcess, redis_url: str, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    env = proxy_env(
        proxy_nats.url, redis_url, fake_upstream, VOICE_AGENT_DEMO_MODE="true", KEYVEIL_WORKERS="2"
    )
    service = ServiceProcess("proxy", env, tmp_path / "proxy.log").start(timeout=60)
    try:
        pids = [int(i.rpartition(":")[2]) for i in _instances(service.url)]
        assert len(pids) == 2
        os.kill(pids[0], signal.SIGKILL)
        assert _wait_exit(service) != 0  # the orchestrator restarts the pod whole
        deadline = time.monotonic() + 10
        while not _gone(pids[1]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(pids[1])
    finally:
        service.stop()


async def test_granian_serves_the_proxy_with_its_lifespan(
    proxy_nats: ServerProcess, redis_url: str, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    env = proxy_env(
        proxy_nats.url,
        redis_url,
        fake_upstream,
        VOICE_AGENT_DEMO_MODE="true",
        KEYVEIL_HTTP_SERVER="granian",
    )
    # Ready means the lifespan ran: /readyz checks the NATS and Redis it opened.
    service = ServiceProcess("proxy", env, tmp_path / "proxy.log").start(timeout=60)
    try:
        browser = Browser(service.url)
        try:
            answer = await browser.post(CHAT, chat_body())
            assert answer.status_code == 200
            assert "demo" in answer.json()["choices"][0]["message"]["content"]
            bad = browser.signed_headers(browser.token(), CHAT, chat_body(), key=b"1" * 32)
            refused = await browser.http.post(CHAT, content=chat_body(), headers=bad)
            assert refused.status_code == 401
            assert refused.json()["error"]["code"]
        finally:
            await browser.close()
        assert service.process is not None
        service.process.send_signal(signal.SIGTERM)
        assert _wait_exit(service) == 0  # lifespan shutdown ran and the server stopped
        assert "Traceback" not in service.log()
    finally:
        service.stop()
