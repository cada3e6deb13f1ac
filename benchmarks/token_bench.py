"""Proxy-token issuance throughput and latency, rate limiting on, against real processes.

Starts a private nats-server and Redis, the fake upstream is not needed (proxy mode
makes no upstream call), and N token service processes; then drives
POST /api/voice-agent/secure-token {"mode": "proxy"} with C concurrent clients, each
request from its own client IP (X-Forwarded-For via a trusted loopback proxy), so
every request pays the full Redis admission round trip and none is refused.

    .venv/bin/python -m benchmarks.token_bench --requests 3000 --concurrency 32 --replicas 2

`--auth oidc` turns on caller authentication against a local OIDC issuer (discovery and
JWKS over HTTP, keys cached after the first request): every request carries a login
of one of 100 users, so the cost of verifying it (RS256) is in every number.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import LatencySummary, add_json_option, write_json
from keyveil.servers import start_nats, start_redis
from tests.services.token.issuer import TestIssuer
from tests.support import TEST_PROXY_SIGNING_KEY, ServiceProcess

ORIGIN = "https://bench.example"


async def _drive(
    urls: list[str], total: int, concurrency: int, logins: list[str] | None = None
) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    failures = 0
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=10, limits=limits) as client:

        async def worker() -> None:
            nonlocal failures
            for n in counter:
                headers = {
                    "Origin": ORIGIN,
                    "X-Forwarded-For": f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}",
                }
                if logins:
                    headers["Authorization"] = f"Bearer {logins[n % len(logins)]}"
                started = time.perf_counter()
                answer = await client.post(
                    f"{urls[n % len(urls)]}/api/voice-agent/secure-token",
                    json={"mode": "proxy"},
                    headers=headers,
                )
                latencies.append(time.perf_counter() - started)
                if answer.status_code != 200:
                    failures += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return elapsed, latencies, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--auth", choices=("anonymous", "oidc"), default="anonymous")
    add_json_option(parser)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="keyveil-bench-") as tmp:
        state = Path(tmp)
        nats_server = start_nats(state, streams=True)  # as `keyveil bootstrap` makes them
        redis_server = start_redis(state)
        env = {
            "NATS_URL": nats_server.url,
            "REDIS_URL": redis_server.url,
            "PROXY_SIGNING_KEY": TEST_PROXY_SIGNING_KEY,
            "ALLOWED_ORIGINS": ORIGIN,
            "TRUSTED_PROXIES": "127.0.0.1/32",
            "VOICE_AGENT_RATE_LIMIT": "10",
            "LOG_LEVEL": "WARNING",
        }
        issuer: TestIssuer | None = None
        logins: list[str] | None = None
        if args.auth == "oidc":
            issuer = TestIssuer()
            env.update(
                KEYVEIL_AUTH_MODE="oidc", OIDC_ISSUER=issuer.issuer, OIDC_AUDIENCE=issuer.audience
            )
            logins = [
                issuer.login(sub=f"user-{i}", exp=int(time.time()) + 3600) for i in range(100)
            ]
        replicas = [
            ServiceProcess("token", env, state / f"token-{i}.log").start(wait_ready=False)
            for i in range(args.replicas)
        ]
        try:
            for replica in replicas:
                replica.wait_ready(timeout=60)
            urls = [r.url for r in replicas]
            asyncio.run(_drive(urls, args.warmup, args.concurrency, logins))
            elapsed, latencies, failures = asyncio.run(
                _drive(urls, args.requests, args.concurrency, logins)
            )
        finally:
            for replica in replicas:
                replica.stop()
            if issuer is not None:
                issuer.close()
            redis_server.stop()
            nats_server.stop()

    summary = LatencySummary.of(latencies, elapsed, ok=len(latencies) - failures)
    print(
        f"proxy-token issuance, rate limiting on (Redis GCRA per client IP), "
        f"{args.replicas} replica(s), concurrency {args.concurrency}, auth {args.auth}"
    )
    print(f"requests     {len(latencies)} ({failures} not 200)")
    print(f"tokens/s     {summary.rate_per_s:.0f}")
    print(f"p50 latency  {summary.p50_ms:.2f} ms")
    print(f"p99 latency  {summary.p99_ms:.2f} ms")
    print(f"mean         {summary.mean_ms:.2f} ms")
    write_json(
        args.json,
        {
            "replicas": args.replicas,
            "concurrency": args.concurrency,
            "auth": args.auth,
            **summary.as_dict(),
        },
    )
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
