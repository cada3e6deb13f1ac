"""Voice benchmark: session set-up added by keyveil, and sidebands one proxy worker holds.

Starts real NATS and Redis, the fake upstream (a real aiortc peer answers every offer
and serves the sidebands), the real key manager and ONE proxy worker. Then:

1. Set-up: the same real SDP offer posted `--sessions` times straight to the fake's
   `POST /v1/live/sessions` and, interleaved, through the proxy (token, signature,
   digest, nonce, rate limits, policy, SDP checks, leased key, registry, sideband
   start). Added = proxy - direct, at p50 and p99.
2. Sidebands: `--sidebands` sessions opened through the proxy and held; the proxy's
   resident memory before and after, per session, once every sideband is attached.

    .venv/bin/python -m benchmarks.voice_bench [--sessions 200] [--sidebands 1000] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import percentile, write_json  # noqa: E402
from benchmarks.proxy_bench import start_service, wait_ready  # noqa: E402
from keyveil.servers import free_port, start_fake_upstream, start_nats, start_redis  # noqa: E402
from shared.signing import sign_request  # noqa: E402
from shared.tokens import ProxyClaims, Scope, TokenKeyring  # noqa: E402
from tests.support import (  # noqa: E402
    TEST_KEY_ENCRYPTION_SECRET,
    TEST_PROVIDER_KEY,
    TEST_PROXY_SIGNING_KEY,
)

PATH = "/api/voice-agent/proxy/v1/live/sessions"
TARGETS = {"added_p50_ms": 5.0, "added_p99_ms": 20.0, "sidebands": 1000, "kib_per_sideband": 64}


async def real_offer() -> str:
    """One browser-like offer (microphone + oai-events) from a real aiortc peer."""
    from aiortc import AudioStreamTrack, RTCConfiguration, RTCPeerConnection

    from shared.testing import fake_voice  # noqa: F401 - ICE on loopback, as the fake

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(AudioStreamTrack())
    pc.createDataChannel("oai-events")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = str(pc.localDescription.sdp)
    await pc.close()
    return sdp


class Signer:
    def __init__(self, authority: str) -> None:
        self.keyring = TokenKeyring(TEST_PROXY_SIGNING_KEY)
        self.authority = authority
        now = int(time.time())
        self.claims = ProxyClaims(
            jti=uuid.uuid4().hex,
            sid=uuid.uuid4().hex,
            scopes=[Scope.voice],
            iat=now,
            exp=now + 3600,
        )
        self.token = self.keyring.issue(self.claims)
        self.key = self.keyring.request_signing_key(self.token, self.claims.jti)

    def headers(self, body: bytes) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        headers.update(
            sign_request(
                method="POST",
                path=PATH,
                body=body,
                authority=self.authority,
                scheme="http",
                headers=headers,
                key=self.key,
                keyid=self.claims.jti,
                nonce=secrets.token_urlsafe(12),
            )
        )
        return headers


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def setup_phase(
    http: httpx.AsyncClient, fake_url: str, proxy_url: str, signer: Signer, body: bytes, n: int
) -> dict[str, Any]:
    direct: list[float] = []
    proxied: list[float] = []
    for i in range(n + 10):
        started = time.perf_counter()
        answer = await http.post(
            f"{fake_url}/v1/live/sessions",
            content=body,
            headers={
                "Authorization": f"Bearer {TEST_PROVIDER_KEY}",
                "Content-Type": "application/json",
            },
        )
        took_direct = time.perf_counter() - started
        assert answer.status_code == 201, answer.text
        started = time.perf_counter()
        answer = await http.post(f"{proxy_url}{PATH}", content=body, headers=signer.headers(body))
        took_proxy = time.perf_counter() - started
        assert answer.status_code == 201, answer.text
        if i >= 10:  # warm-up: pools, lease, JIT-free Python caches
            direct.append(took_direct)
            proxied.append(took_proxy)
        if i % 20 == 19:
            await http.delete(f"{fake_url}/_fake/sessions")  # keep the fake's peers few
    await http.delete(f"{fake_url}/_fake/sessions")
    out: dict[str, Any] = {"sessions": n}
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        d, p = percentile(direct, q) * 1000, percentile(proxied, q) * 1000
        out[f"direct_{name}_ms"] = round(d, 3)
        out[f"proxy_{name}_ms"] = round(p, 3)
        out[f"added_{name}_ms"] = round(p - d, 3)
    return out


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + '{endpoint="voice_live"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def in_proxy(http: httpx.AsyncClient, proxy_url: str) -> dict[str, float]:
    """The proxy's own view: time spent besides the upstream call, and the call itself."""
    text = (await http.get(f"{proxy_url}/metrics")).text
    count = _metric(text, "keyveil_proxy_added_latency_seconds_count") or 1.0
    added = _metric(text, "keyveil_proxy_added_latency_seconds_sum") / count
    upstream = _metric(text, "keyveil_proxy_upstream_latency_seconds_sum") / count
    return {
        "in_proxy_mean_ms": round(added * 1000, 3),
        "upstream_mean_ms": round(upstream * 1000, 3),
    }


async def sideband_phase(
    http: httpx.AsyncClient,
    fake_url: str,
    proxy_url: str,
    proxy_pid: int,
    signer: Signer,
    body: bytes,
    n: int,
) -> dict[str, Any]:
    await asyncio.sleep(2)  # let the set-up phase's sidebands finish closing
    before = rss_kib(proxy_pid)
    opened = 0
    refused: dict[str, int] = {}
    gate = asyncio.Semaphore(4)

    async def open_one() -> None:
        nonlocal opened
        async with gate:
            answer = await http.post(
                f"{proxy_url}{PATH}", content=body, headers=signer.headers(body)
            )
            if answer.status_code == 201:
                opened += 1
            else:
                code = answer.json().get("error", {}).get("code", "?")
                refused[f"{answer.status_code} {code}"] = (
                    refused.get(f"{answer.status_code} {code}", 0) + 1
                )

    started = time.monotonic()
    await asyncio.gather(*(open_one() for _ in range(n)))
    opened_s = time.monotonic() - started
    attached = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        sessions = (await http.get(f"{fake_url}/_fake/sessions")).json()["sessions"]
        attached = sum(1 for s in sessions if s["state"] == "open" and s["sidebands"] >= 1)
        if attached >= opened:
            break
        await asyncio.sleep(1)
    await asyncio.sleep(3)  # a few supervisor ticks and usage events with all of them held
    after = rss_kib(proxy_pid)
    ready = (await http.get(f"{proxy_url}/readyz")).status_code == 200
    return {
        "requested": n,
        "opened": opened,
        "attached": attached,
        "open_seconds": round(opened_s, 2),
        "refused": refused,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_sideband": round((after - before) / max(attached, 1), 1),
        "proxy_ready_while_holding": ready,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=200, help="set-up samples per side")
    parser.add_argument("--sidebands", type=int, default=1000, help="sessions held at once")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="keyveil-voice-bench-"))
    nats_server = start_nats(state, streams=True)  # as `keyveil bootstrap` makes them
    redis_server = start_redis(state)
    fake = start_fake_upstream(state)
    up_port = fake.port
    processes = []
    try:
        km_port, proxy_port = free_port(), free_port()
        processes.append(
            start_service(
                "keymanager",
                {
                    "NATS_URL": nats_server.url,
                    "KEY_ENCRYPTION_SECRET": TEST_KEY_ENCRYPTION_SECRET,
                    "OPENAI_API_KEY": TEST_PROVIDER_KEY,
                },
                km_port,
                state / "keymanager.log",
            )
        )
        await wait_ready(km_port)
        proxy = start_service(
            "proxy",
            {
                "NATS_URL": nats_server.url,
                "REDIS_URL": redis_server.url,
                "PROXY_SIGNING_KEY": TEST_PROXY_SIGNING_KEY,
                "OPENAI_BASE_URL": f"http://127.0.0.1:{up_port}/v1",
                "VOICE_AGENT_PROXY_RATE_LIMIT": "1000000",
                "VOICE_AGENT_PROXY_IP_RATE_LIMIT": "10000000",
            },
            proxy_port,
            state / "proxy.log",
        )
        processes.append(proxy)
        await wait_ready(proxy_port)
        fake_url = f"http://127.0.0.1:{up_port}"
        proxy_url = f"http://127.0.0.1:{proxy_port}"
        body = orjson.dumps(
            {
                "session": {"model": "gpt-live-1"},
                "transport": {"type": "webrtc", "sdp": await real_offer()},
            }
        )
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
        async with httpx.AsyncClient(timeout=60, limits=limits, trust_env=False) as http:
            await http.post(f"{fake_url}/_fake/behaviour", json={"voice_tick_ms": 5000})
            signer = Signer(f"127.0.0.1:{proxy_port}")
            print(f"keyveil voice benchmark: one proxy worker, {os.cpu_count()} CPUs")
            setup = await setup_phase(http, fake_url, proxy_url, signer, body, args.sessions)
            setup.update(await in_proxy(http, proxy_url))
            print(
                f"set-up over {setup['sessions']} sessions: "
                f"direct p50 {setup['direct_p50_ms']:.2f} "
                f"/ p99 {setup['direct_p99_ms']:.2f} ms, proxy p50 {setup['proxy_p50_ms']:.2f} / "
                f"p99 {setup['proxy_p99_ms']:.2f} ms, added p50 {setup['added_p50_ms']:.2f} / "
                f"p99 {setup['added_p99_ms']:.2f} ms; inside the proxy (its own metrics): "
                f"{setup['in_proxy_mean_ms']:.2f} ms mean besides the upstream call, which took "
                f"{setup['upstream_mean_ms']:.2f} ms mean from the proxy"
            )
            held = await sideband_phase(
                http, fake_url, proxy_url, proxy.pid, signer, body, args.sidebands
            )
            # A rolling deploy: SIGTERM while holding them all (they are let go, not ended).
            stopping = time.monotonic()
            proxy.terminate()
            await asyncio.to_thread(proxy.wait, 60)
            held["shutdown_s_holding"] = round(time.monotonic() - stopping, 2)
            processes.remove(proxy)
            await http.delete(f"{fake_url}/_fake/sessions")
            print(
                f"sidebands: {held['attached']} of {held['requested']} attached "
                f"({held['opened']} opened in {held['open_seconds']} s), "
                f"proxy RSS {held['rss_before_kib']} -> "
                f"{held['rss_after_kib']} KiB = {held['kib_per_sideband']} KiB per sideband, "
                f"ready while holding: {held['proxy_ready_while_holding']}, "
                f"SIGTERM to exit while holding them: {held['shutdown_s_holding']} s"
            )
        results: dict[str, Any] = {"setup": setup, "sidebands": held}
        results["targets"] = {
            "added_p50_le_5ms": setup["added_p50_ms"] <= TARGETS["added_p50_ms"],
            "added_p99_le_20ms": setup["added_p99_ms"] <= TARGETS["added_p99_ms"],
            "sidebands_ge_1000": held["attached"] >= TARGETS["sidebands"],
            "kib_per_sideband_le_64": held["kib_per_sideband"] <= TARGETS["kib_per_sideband"],
        }
        results["machine"] = {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}
        print(
            "targets:",
            ", ".join(f"{k}={'met' if v else 'NOT met'}" for k, v in results["targets"].items()),
        )
        write_json(args.json, results)
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                print(f"pid {process.pid} did not stop within 30 s; killed")
                process.kill()
                process.wait(5)
        fake.stop()
        redis_server.stop()
        nats_server.stop()


if __name__ == "__main__":
    asyncio.run(main())
