"""Proxy benchmark: throughput and added latency against the fake upstream.

Starts real NATS and Redis, the fake upstream, the real key manager (bootstrapped with
a bench provider key) and ONE proxy worker with every check on: token, signature and
Content-Digest, nonce, rate limits, revocation and IP block (one Redis round trip), and
a usage event per request. The same load generator measures the upstream alone
(direct) and through the proxy in the same run, so "added" latency is proxy - direct.

The load generator is lean on purpose: raw asyncio protocols on uvloop (one keep-alive
HTTP/1.1 connection per simulated client) and requests signed ahead of the timed run,
each with its own fresh nonce and `created` (what a fast client would do anyway).

    .venv/bin/python benchmarks/proxy_bench.py [--requests 4000] [--json PATH] [--profile]

Prints latency (p50/p99, direct vs proxy) at 1 and 16 clients, throughput at 16 and 64
clients, the CPU each process used per request, and with --profile where the proxy's
time goes (py-spy).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from keyveil.servers import ServerProcess, free_port, start_nats, start_redis, wait_for_port  # noqa: E402
from shared.signing import sign_request  # noqa: E402
from shared.tokens import ProxyClaims, Scope, TokenKeyring  # noqa: E402
from tests.support import (  # noqa: E402
    TEST_KEY_ENCRYPTION_SECRET,
    TEST_PROVIDER_KEY,
    TEST_PROXY_SIGNING_KEY,
)

# The test suite's throwaway secrets: one place for values that only ever meet the fake.
SIGNING_KEY = TEST_PROXY_SIGNING_KEY
KEK_SECRET = TEST_KEY_ENCRYPTION_SECRET
PROVIDER_KEY = TEST_PROVIDER_KEY
PATH = "/api/voice-agent/proxy/v1/chat/completions"
BODY = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
TARGETS = {"added_p50_ms_1": 1.0, "added_p99_ms_1": 5.0, "rps_per_worker": 2000.0}
_TICK = os.sysconf("SC_CLK_TCK")


class Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, parsing just enough of each response."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None:
            status = self._complete()
            if status is not None:
                self.waiter.set_result(status)
                self.waiter = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("server closed the connection"))

    def _complete(self) -> int | None:
        """The status once a whole response is buffered (and consumed), else None."""
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(buf[:end]).lower()
        at = end + 4
        if b"transfer-encoding: chunked" in head:
            while True:
                line_end = buf.find(b"\r\n", at)
                if line_end < 0:
                    return None
                size = int(buf[at:line_end], 16)
                at = line_end + 2 + size + 2
                if at > len(buf):
                    return None
                if size == 0:
                    break
        else:
            start = head.index(b"content-length:") + 15
            at += int(head[start:].split(b"\r\n", 1)[0])
            if at > len(buf):
                return None
        del buf[:at]
        return int(head[9:12])

    async def roundtrip(self, request: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


async def connect(port: int) -> Conn:
    _, conn = await asyncio.get_running_loop().create_connection(Conn, "127.0.0.1", port)
    return conn


def _request(path: str, headers: dict[str, str], port: int) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {len(BODY)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + BODY


class Signer:
    """One proxy token per simulated browser; requests signed with fresh nonces."""

    def __init__(self, port: int, clients: int) -> None:
        ring = TokenKeyring(SIGNING_KEY)
        self.port = port
        self.tokens = []
        for _ in range(clients):
            now = int(time.time())
            claims = ProxyClaims(
                jti=uuid.uuid4().hex, sid="bench", scopes=[Scope.chat], iat=now, exp=now + 3600
            )
            token = ring.issue(claims)
            self.tokens.append((token, claims.jti, ring.request_signing_key(token, claims.jti)))

    def batch(self, client: int, count: int) -> list[bytes]:
        token, jti, key = self.tokens[client]
        out = []
        for _ in range(count):
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            headers.update(
                sign_request(
                    method="POST",
                    path=PATH,
                    body=BODY,
                    key=key,
                    keyid=jti,
                    nonce=secrets.token_urlsafe(12),
                )
            )
            out.append(_request(PATH, headers, self.port))
        return out


@dataclass
class Phase:
    latencies: list[float]
    wall_s: float
    requests: int
    cpu_s: dict[str, float]

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


async def run(port: int, work: Sequence[Sequence[bytes]], pids: dict[str, int]) -> Phase:
    """Each inner sequence is one client's requests, sent back to back on its connection."""
    conns = [await connect(port) for _ in work]
    latencies: list[float] = []
    statuses: collections.Counter[int] = collections.Counter()
    clock = time.perf_counter

    async def client(conn: Conn, requests: Sequence[bytes]) -> None:
        for request in requests:
            started = clock()
            statuses[await conn.roundtrip(request)] += 1
            latencies.append(clock() - started)

    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    before["generator"] = time.process_time()
    started = clock()
    await asyncio.gather(
        *(client(conn, requests) for conn, requests in zip(conns, work, strict=True))
    )
    wall = clock() - started
    cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    cpu["generator"] = time.process_time() - before["generator"]
    for conn in conns:
        assert conn.transport is not None
        conn.transport.close()
    if set(statuses) != {200}:
        raise SystemExit(f"unexpected statuses: {dict(statuses)}")
    return Phase(latencies, wall, len(latencies), cpu)


def profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(seconds))),
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


AREAS = {
    "uvicorn/httptools (HTTP server, ASGI)": ("uvicorn/", "httptools"),
    "upstream client (proxy/http1.py)": ("proxy/http1.py", "proxy/upstream.py:send"),
    "redis client (admission round trip)": ("redis/",),
    "signature + digest verify": ("shared/signing.py", "http_sf"),
    "token cache and checks (guard.py, access.py)": ("shared/guard.py", "proxy/access.py"),
    "request body read + JSON parse": ("proxy/bodies.py",),
    "usage event (build + publish)": ("shared/events.py", "_finish", "nats/"),
    "prometheus metrics": ("prometheus_client/",),
    "lease key (opened-key cache)": ("proxy/upstream.py:authorization", "shared/leases.py"),
}


def summarise_profile(path: Path) -> dict[str, float]:
    """Inclusive share of samples per area of the code, from py-spy's collapsed stacks."""
    total = 0
    counts: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        samples = int(n)
        total += samples
        frames = stack.split(";")
        if frames:
            leaf[frames[-1].split(" (")[0]] += samples
        for area, needles in AREAS.items():
            if any(needle in stack for needle in needles):
                counts[area] += samples
    if not total:
        print("  (no samples)")
        return {}
    print(f"  {total} samples (inclusive share; areas overlap where they call each other)")
    for area, n in counts.most_common():
        print(f"  {100 * n / total:5.1f}%  {area}")
    print("  top self-time functions:")
    for name, n in leaf.most_common(10):
        print(f"  {100 * n / total:5.1f}%  {name}")
    return {area: round(100 * n / total, 1) for area, n in counts.items()}


def split(requests: list[bytes], clients: int) -> list[list[bytes]]:
    return [requests[i::clients] for i in range(clients)]


class Bench:
    def __init__(self, proxy_port: int, up_port: int, pids: dict[str, int]) -> None:
        self.proxy_port = proxy_port
        self.up_port = up_port
        self.pids = pids
        self.direct = _request(
            "/v1/chat/completions",
            {"Authorization": f"Bearer {PROVIDER_KEY}", "Content-Type": "application/json"},
            up_port,
        )

    async def direct_phase(self, clients: int, total: int) -> Phase:
        per = max(1, total // clients)
        return await run(self.up_port, [[self.direct] * per for _ in range(clients)], self.pids)

    async def proxy_phase(
        self, clients: int, total: int, before: Callable[[], None] | None = None
    ) -> Phase:
        signer = Signer(self.proxy_port, clients)
        per = max(1, total // clients)
        work = [signer.batch(i, per) for i in range(clients)]  # signed before the clock starts
        if before is not None:
            before()
        return await run(self.proxy_port, work, self.pids)


def _levels(phase: Phase) -> dict[str, float]:
    return {
        "p50_ms": round(phase.pct(0.5), 3),
        "p99_ms": round(phase.pct(0.99), 3),
        "rate_per_s": round(phase.rps, 1),
    }


def _cpu(proxied: Phase) -> dict[str, float]:
    """CPU seconds each process used per proxied request (us), and the proxy's core share."""
    out = {
        f"{name}_us": round(1e6 * sec / proxied.requests, 1) for name, sec in proxied.cpu_s.items()
    }
    out["proxy_core_share"] = round(proxied.cpu_s["proxy"] / proxied.wall_s, 3)
    return out


async def measure(bench: Bench, n: int, profile_to: Path | None) -> dict[str, Any]:
    """The numbers, in the shape benchmarks/report.py reads.

    latency[c] / direct[c]: p50_ms, p99_ms, rate_per_s (proxy / upstream alone);
    added_ms[c]: p50, p99 (proxy - direct, same run) for c in 1, 16;
    throughput[c]: rate_per_s, p50_ms, p99_ms, cpu_per_request for c in 16, 64.
    """
    await bench.proxy_phase(16, 400)  # warm-up: lease, pools, token caches
    await bench.direct_phase(16, 400)
    results: dict[str, Any] = {"latency": {}, "direct": {}, "added_ms": {}, "throughput": {}}
    print("latency (ms)         direct p50   p99 |  proxy p50   p99 |  added p50   p99")
    for clients in (1, 16):
        key = str(clients)
        direct = await bench.direct_phase(clients, n // 2 if clients == 1 else n)
        proxied = await bench.proxy_phase(clients, n // 2 if clients == 1 else n)
        d, p = _levels(direct), _levels(proxied)
        added = {
            "p50": round(p["p50_ms"] - d["p50_ms"], 3),
            "p99": round(p["p99_ms"] - d["p99_ms"], 3),
        }
        results["direct"][key], results["latency"][key], results["added_ms"][key] = d, p, added
        print(
            f"{clients:>3} client(s)        {d['p50_ms']:9.2f} {d['p99_ms']:5.2f}"
            f" | {p['p50_ms']:9.2f} {p['p99_ms']:5.2f}"
            f" | {added['p50']:9.2f} {added['p99']:5.2f}"
        )
        if clients == 16:
            results["throughput"][key] = {**p, "cpu_per_request": _cpu(proxied)}
    spy: subprocess.Popen[bytes] | None = None

    def start_profile() -> None:
        nonlocal spy
        if profile_to is not None:
            spy = profile(bench.pids["proxy"], 3, profile_to)

    direct = await bench.direct_phase(64, 2 * n)
    proxied = await bench.proxy_phase(64, 2 * n, before=start_profile)
    results["direct"]["64"] = _levels(direct)
    results["throughput"]["64"] = {**_levels(proxied), "cpu_per_request": _cpu(proxied)}
    print(
        "throughput (req/s)   direct | proxy  ratio | CPU per proxied request (us):"
        " proxy (core share) upstream redis nats generator"
    )
    for key, row in results["throughput"].items():
        cpu = row["cpu_per_request"]
        rate = results["direct"][key]["rate_per_s"]
        print(
            f"{key:>3} clients          {rate:6.0f} | {row['rate_per_s']:5.0f} "
            f"{row['rate_per_s'] / rate:6.2f} | {cpu['proxy_us']:6.0f}"
            f" ({cpu['proxy_core_share']:.2f})"
            f" {cpu['upstream_us']:8.0f} {cpu['redis_us']:5.0f} {cpu['nats_us']:4.0f}"
            f" {cpu['generator_us']:9.0f}"
        )
    if spy is not None:
        spy.wait(30)
    return results


def verdict(results: dict[str, Any]) -> dict[str, bool]:
    one = results["added_ms"]["1"]
    best = max(row["rate_per_s"] for row in results["throughput"].values())
    return {
        "added_p50_le_1ms_at_1_client": one["p50"] <= TARGETS["added_p50_ms_1"],
        "added_p99_le_5ms_at_1_client": one["p99"] <= TARGETS["added_p99_ms_1"],
        "throughput_ge_2000_rps": best >= TARGETS["rps_per_worker"],
    }


def start_service(
    name: str, env: dict[str, str], port: int, log: Path, *, health: bool = True
) -> subprocess.Popen[bytes]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "NATS_"))}
    full.update(env, KEYVEIL_PORT=str(port), LOG_LEVEL="WARNING")
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", f"services.{name}"],
            env=full,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    wait_for_port(port, timeout=30, process=process)
    return process


async def wait_ready(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    request = f"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    while time.monotonic() < deadline:
        conn = await connect(port)
        try:
            if await conn.roundtrip(request) == 200:
                return
        finally:
            assert conn.transport is not None
            conn.transport.close()
        await asyncio.sleep(0.2)
    raise SystemExit(f"port {port} not ready after {timeout}s")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=4000, help="requests per phase")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    parser.add_argument("--profile", action="store_true", help="py-spy the proxy at 64 clients")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="keyveil-bench-"))
    nats_server = start_nats(state, streams=True)
    redis_server = start_redis(state)
    up_port = free_port()
    fake = ServerProcess(
        "fake-upstream",
        f"http://127.0.0.1:{up_port}",
        up_port,
        [sys.executable, "-m", "shared.testing.fake_upstream", "--port", str(up_port)],
        state / "fake.log",
    )
    fake.start()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        km_port, proxy_port = free_port(), free_port()
        processes.append(
            start_service(
                "keymanager",
                {
                    "NATS_URL": nats_server.url,
                    "KEY_ENCRYPTION_SECRET": KEK_SECRET,
                    "OPENAI_API_KEY": PROVIDER_KEY,
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
                "PROXY_SIGNING_KEY": SIGNING_KEY,
                "OPENAI_BASE_URL": f"http://127.0.0.1:{up_port}/v1",
                "VOICE_AGENT_PROXY_RATE_LIMIT": "1000000",
                "VOICE_AGENT_PROXY_IP_RATE_LIMIT": "10000000",
            },
            proxy_port,
            state / "proxy.log",
        )
        processes.append(proxy)
        await wait_ready(proxy_port)
        pids = {"proxy": proxy.pid, "upstream": _pid(fake), "redis": _pid(redis_server)}
        pids["nats"] = _pid(nats_server)
        print(
            f"keyveil proxy benchmark: one proxy worker, {os.cpu_count()} CPUs, "
            f"{args.requests} requests per phase (64 clients: twice that); "
            "checks: token, signature + digest, nonce, rate limits, revocation, IP block, "
            "usage event"
        )
        results = await measure(
            Bench(proxy_port, up_port, pids),
            args.requests,
            state / "profile.txt" if args.profile else None,
        )
        results["targets"] = verdict(results)
        results["machine"] = {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}
        results["requests_per_phase"] = args.requests
        print(
            "targets:",
            ", ".join(f"{k}={'met' if v else 'NOT met'}" for k, v in results["targets"].items()),
        )
        print(f"1-minute load average at the end: {os.getloadavg()[0]:.2f}")
        if args.profile:
            print("where the proxy's time goes (py-spy, 64 clients):")
            results["profile_share_pct"] = summarise_profile(state / "profile.txt")
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
            print(f"wrote {args.json}")
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(15)
        fake.stop()
        redis_server.stop()
        nats_server.stop()


def _pid(server: ServerProcess) -> int:
    process = server.process
    assert process is not None
    return process.pid


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
