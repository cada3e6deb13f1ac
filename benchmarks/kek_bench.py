"""Lease throughput by KEK provider: `local` against `vault-transit` (real OpenBao).

    .venv/bin/python -m benchmarks.kek_bench [--leases 1500] [--concurrency 16]

One key-manager process per provider on one real nats-server; every lease is a full
round trip (the client cache is dropped each time). With vault-transit the data key is
unwrapped by OpenBao once and then served from the key-manager's in-memory cache
(KEK_CACHE_TTL_S), so the ratio shows what the cache buys. Prints leases/s, p50/p99 and
the vault/local throughput ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import nats

from benchmarks.common import LatencySummary, add_json_option, write_json
from keyveil.servers import start_nats
from shared.leases import LeaseClient
from tests.services.keymanager.kms_servers import KekBackend, start_openbao
from tests.support import TEST_PROVIDER_KEY, ServiceProcess


async def _leases(url: str, total: int, concurrency: int) -> LatencySummary:
    nc = await nats.connect(url)
    clients = [
        LeaseClient(nc, requester="proxy", environment="development") for _ in range(concurrency)
    ]
    for client in clients[:2]:  # warm up (and fill the data-key cache)
        await client.authorization()
    latencies: list[float] = []
    per_worker = total // concurrency

    async def worker(client: LeaseClient) -> None:
        for _ in range(per_worker):
            client.invalidate()
            started = time.perf_counter()
            header, _ = await client.authorization()
            latencies.append(time.perf_counter() - started)
            assert header.startswith("Bearer ")

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in clients))
    summary = LatencySummary.of(latencies, time.perf_counter() - started)
    await nc.drain()
    return summary


async def bench(total: int, concurrency: int, rounds: int) -> dict[str, LatencySummary]:
    state = Path(tempfile.mkdtemp(prefix="kek-bench-"))
    server = start_nats(state, streams=True)  # as `keyveil bootstrap` makes them
    bao = start_openbao(state)
    results: dict[str, LatencySummary] = {}
    backends = {"local": KekBackend("local"), "vault-transit": KekBackend("vault-transit", bao=bao)}
    try:
        # Interleaved rounds, best of each: a shared machine's noise hits both alike.
        for round_no in range(rounds):
            for name in (
                ("local", "vault-transit") if round_no % 2 == 0 else ("vault-transit", "local")
            ):
                backend = backends[name]
                env = {k: str(v) for k, v in backend.overrides().items() if v is not None}
                env.update(
                    NATS_URL=server.url,
                    OPENAI_API_KEY=TEST_PROVIDER_KEY,
                    LOG_LEVEL="WARNING",
                    KEYMANAGER_KV_BUCKET=f"BENCH_{name.replace('-', '_').upper()}",
                    KEK_CACHE_TTL_S="300",
                )
                service = ServiceProcess("keymanager", env, state / f"km-{name}.log")
                service.start()
                try:
                    summary = await _leases(server.url, total, concurrency)
                finally:
                    service.stop()
                print(f"{name:14s} concurrency={concurrency}: {summary.line()}")
                if name not in results or summary.rate_per_s > results[name].rate_per_s:
                    results[name] = summary
    finally:
        bao.server.stop()
        server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--leases", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    add_json_option(parser)
    args = parser.parse_args()
    results = asyncio.run(bench(args.leases, args.concurrency, args.rounds))
    local, vault = results["local"].as_dict(), results["vault-transit"].as_dict()
    ratio = vault["rate_per_s"] / local["rate_per_s"] if local["rate_per_s"] else 0.0
    print(
        f"best of {args.rounds}: local {local['rate_per_s']:,.0f}/s, "
        f"vault-transit {vault['rate_per_s']:,.0f}/s"
    )
    print(f"vault-transit / local throughput: {ratio:.2f}")
    write_json(args.json, {"local": local, "vault-transit": vault, "ratio": round(ratio, 3)})


if __name__ == "__main__":
    main()
