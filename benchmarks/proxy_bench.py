"""Proxy benchmark: throughput and added latency against the fake upstream.

Starts real NATS and Redis, the fake upstream, a lease responder (sealing a test key
exactly as the key manager does) and ONE proxy worker with every check on (token,
signature + digest, nonce, rate limits, revocation and IP block in one Redis round
trip, usage event). The load generator is a minimal keep-alive HTTP/1.1 client on raw
asyncio streams, so it costs less CPU than the thing it measures; requests are signed
ahead of time in small batches (each carries a fresh nonce and `created`).

    .venv/bin/python benchmarks/proxy_bench.py [--requests 4000] [--profile]

Prints: direct vs proxy latency p50/p99 at 1 and 16 clients (added = proxy - direct),
throughput at 16 and 64 clients; with --profile, where the proxy's time goes (py-spy).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nats
import orjson
from nats.aio.msg import Msg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from keyveil.servers import ServerProcess, free_port, start_nats, start_redis, wait_for_port  # noqa: E402
from shared.crypto import b64url_decode, b64url_encode, seal_for_requester  # noqa: E402
from shared.leases import KEYMANAGER_QUEUE, LEASE_SUBJECT, LeaseReply, LeaseRequest  # noqa: E402
from shared.signing import sign_request  # noqa: E402
from shared.tokens import ProxyClaims, Scope, TokenKeyring  # noqa: E402

SIGNING_KEY = "bench-psk-" + "Qw3Er5Ty7Ui9Op1As2Df4Gh6Jk8Lz0Xc"
PROVIDER_KEY = "sk-bench-provider-key-0123456789abcdef"
PATH = "/api/voice-agent/proxy/v1/chat/completions"
BODY = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


class Conn:
    """One keep-alive HTTP/1.1 connection; enough protocol for these two servers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def roundtrip(self, request: bytes) -> int:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            while True:
                size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            at = lower.index(b"content-length:") + 15
            length = int(lower[at : lower.index(b"\r\n", at)])
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


def _request(path: str, headers: dict[str, str], port: int) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {len(BODY)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + BODY


class Signer:
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

    def request(self, client: int) -> bytes:
        token, jti, key = self.tokens[client]
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
        return _request(PATH, headers, self.port)


async def run(port: int, clients: int, total: int, make: object) -> tuple[list[float], float]:
    """`total` requests over `clients` connections; latencies (s) and wall time."""
    conns = [await Conn.open(port) for _ in range(clients)]
    per_client = total // clients
    latencies: list[float] = []
    statuses: collections.Counter[int] = collections.Counter()

    async def worker(i: int) -> None:
        conn = conns[i]
        for _ in range(per_client):
            request = make(i)  # type: ignore[operator]
            started = time.perf_counter()
            statuses[await conn.roundtrip(request)] += 1
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    wall = time.perf_counter() - started
    for conn in conns:
        conn.close()
    if set(statuses) != {200}:
        raise SystemExit(f"unexpected statuses: {dict(statuses)}")
    return latencies, wall


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def lease_responder(nats_url: str) -> object:
    nc = await nats.connect(nats_url)

    async def on(msg: Msg) -> None:
        request = LeaseRequest.model_validate_json(msg.data)
        reply = LeaseReply(
            lease_id=uuid.uuid4().hex,
            key_id="bench",
            version=1,
            provider=request.provider,
            environment=request.environment,
            expires_at=time.time() + 3600,
            sealed="",
        )
        sealed = seal_for_requester(
            PROVIDER_KEY.encode(),
            b64url_decode(request.public_key),
            info=reply.info_for(request),
            kem=request.kem,
        )
        update = {"sealed": b64url_encode(sealed)}
        await msg.respond(reply.model_copy(update=update).model_dump_json().encode())

    await nc.subscribe(LEASE_SUBJECT, queue=KEYMANAGER_QUEUE, cb=on)
    return nc


def profile(pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
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


def summarise_profile(path: Path) -> None:
    """Inclusive share of samples per area of the code, from py-spy's collapsed stacks."""
    areas = {
        "uvicorn/httptools (HTTP parsing, ASGI)": ("uvicorn/", "httptools"),
        "starlette responses/CORS": ("starlette/",),
        "httpx/httpcore (upstream client)": ("httpx/", "httpcore/"),
        "redis client (admission)": ("redis/",),
        "signature verify (shared/signing)": ("shared/signing.py",),
        "HPKE lease open (shared/leases)": ("shared/leases.py",),
        "token cache (access.py)": ("proxy/access.py",),
        "usage event (pydantic + publish)": ("shared/events.py", "handler.py:_finish", "pydantic"),
        "nats client": ("nats/",),
        "prometheus metrics": ("prometheus_client/",),
    }
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
        for area, needles in areas.items():
            if any(needle in stack for needle in needles):
                counts[area] += samples
    if not total:
        print("  (no samples)")
        return
    print(f"  {total} samples (inclusive share; areas overlap where they call each other)")
    for area, n in counts.most_common():
        print(f"  {100 * n / total:5.1f}%  {area}")
    print("  top self-time functions:")
    for name, n in leaf.most_common(8):
        print(f"  {100 * n / total:5.1f}%  {name}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="keyveil-bench-"))
    nats_server = start_nats(state)
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
    responder = await lease_responder(nats_server.url)
    proxy_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "NATS_"))}
    env.update(
        NATS_URL=nats_server.url,
        REDIS_URL=redis_server.url,
        PROXY_SIGNING_KEY=SIGNING_KEY,
        OPENAI_BASE_URL=f"http://127.0.0.1:{up_port}/v1",
        KEYVEIL_PORT=str(proxy_port),
        VOICE_AGENT_PROXY_RATE_LIMIT="1000000",
        VOICE_AGENT_PROXY_IP_RATE_LIMIT="10000000",
        LOG_LEVEL="WARNING",
    )
    with (state / "proxy.log").open("wb") as log:
        proxy = subprocess.Popen(  # noqa: ASYNC220 - started once, before measuring
            [sys.executable, "-m", "services.proxy"],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(proxy_port, timeout=30, process=proxy)
        direct_headers = {
            "Authorization": f"Bearer {PROVIDER_KEY}",
            "Content-Type": "application/json",
        }
        direct = _request("/v1/chat/completions", direct_headers, up_port)
        n = args.requests
        print(
            f"keyveil proxy benchmark: one proxy worker, {os.cpu_count()} CPUs, {n} requests/phase"
        )
        for clients in (1, 16):
            signer = Signer(proxy_port, clients)
            await run(proxy_port, clients, 200, signer.request)  # warm-up (lease, pools)
            await run(up_port, clients, 200, lambda _: direct)
            lat_direct, _ = await run(up_port, clients, n // 2, lambda _: direct)
            lat_proxy, _ = await run(proxy_port, clients, n // 2, signer.request)
            d50, d99 = pct(lat_direct, 0.50), pct(lat_direct, 0.99)
            p50, p99 = pct(lat_proxy, 0.50), pct(lat_proxy, 0.99)
            print(
                f"{clients:>3} client(s): direct p50 {d50:6.2f} ms p99 {d99:6.2f} ms | "
                f"proxy p50 {p50:6.2f} ms p99 {p99:6.2f} ms | "
                f"added p50 {p50 - d50:5.2f} ms p99 {p99 - d99:5.2f} ms"
            )
        for clients in (16, 64):
            signer = Signer(proxy_port, clients)
            total = max(n, clients * 20)
            spy = None
            if args.profile and clients == 64:
                spy = profile(proxy.pid, 6, state / "profile.txt")
                await asyncio.sleep(1.0)
            _, wall = await run(up_port, clients, total, lambda _: direct)
            direct_rps = total / wall
            lat, wall = await run(proxy_port, clients, total, signer.request)
            print(
                f"{clients:>3} clients: proxy {total / wall:7.0f} req/s "
                f"(p50 {pct(lat, 0.5):.2f} ms, p99 {pct(lat, 0.99):.2f} ms); "
                f"upstream alone {direct_rps:7.0f} req/s"
            )
            if spy is not None:
                spy.wait(30)
        if args.profile:
            print("where the proxy's time goes (py-spy, 64 clients):")
            summarise_profile(state / "profile.txt")
    finally:
        proxy.terminate()
        proxy.wait(15)
        await responder.drain()  # type: ignore[attr-defined]
        fake.stop()
        redis_server.stop()
        nats_server.stop()


if __name__ == "__main__":
    asyncio.run(main())
