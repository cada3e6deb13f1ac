"""Lease throughput and latency against a real nats-server and a real key-manager process.

    .venv/bin/python -m benchmarks.lease_bench [--leases 2000] [--concurrency 16] [--kem x25519]

Every lease is a full round trip (the client cache is dropped each time): request,
KV read, decrypt, HPKE seal, reply, unseal. Prints leases/s and p50/p99 latency.
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
from shared.crypto import Kem
from shared.leases import LeaseClient
from tests.support import (
    TEST_KEY_ENCRYPTION_SECRET,
    TEST_PROVIDER_KEY,
    ServiceProcess,
)


async def bench(total: int, concurrency: int, kem: Kem, replicas: int) -> LatencySummary:
    state = Path(tempfile.mkdtemp(prefix="lease-bench-"))
    server = start_nats(state, streams=True)  # as `keyveil bootstrap` makes them
    env = {
        "NATS_URL": server.url,
        "KEY_ENCRYPTION_SECRET": TEST_KEY_ENCRYPTION_SECRET,
        "OPENAI_API_KEY": TEST_PROVIDER_KEY,
        "LOG_LEVEL": "WARNING",
    }
    services = [ServiceProcess("keymanager", env, state / f"km{i}.log") for i in range(replicas)]
    try:
        for service in services:
            service.start()
        nc = await nats.connect(server.url)
        clients = [
            LeaseClient(nc, requester="proxy", environment="development", kem=kem)
            for _ in range(concurrency)
        ]
        for client in clients[:2]:  # warm up
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
        elapsed = time.perf_counter() - started
        summary = LatencySummary.of(latencies, elapsed)
        print(f"kem={kem.value} replicas={replicas} concurrency={concurrency}: {summary.line()}")
        await nc.drain()
    finally:
        for service in services:
            service.stop()
        server.stop()
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--leases", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--kem", choices=[k.value for k in Kem], default=Kem.x25519.value)
    add_json_option(parser)
    args = parser.parse_args()
    summary = asyncio.run(bench(args.leases, args.concurrency, Kem(args.kem), args.replicas))
    write_json(
        args.json,
        {"kem": args.kem, "concurrency": args.concurrency, **summary.as_dict()},
    )


if __name__ == "__main__":
    main()
