"""Admission throughput per Redis topology: standalone vs Sentinel vs Cluster.

Starts real valkey servers (keyveil.servers): one standalone server, a Sentinel set (1
master, 1 replica, 3 sentinels) and a 3-master cluster, then drives one `Admission`
(pipelined, as the proxy builds it) per topology with CONCURRENCY concurrent callers doing
the proxy's check (IP block, token revocation, nonce, user revocation, per-token, per-ip
and per-user layers over many subjects: three slot groups on the cluster). Phases
alternate twice and the better of each is kept, to damp a shared machine's noise.

    .venv/bin/python -m benchmarks.topology_bench [--seconds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import add_json_option, write_json
from keyveil.servers import start_redis, start_redis_cluster, start_redis_sentinel
from shared.ratelimit import Admission, Limit
from shared.redistopology import RedisTopology, connect

CONCURRENCY = 64


async def drive(admission: Admission, seconds: float, tag: str) -> dict[str, float]:
    latencies: list[float] = []
    refused = 0
    counter = 0
    stop = time.perf_counter() + seconds

    async def caller(worker: int) -> None:
        nonlocal refused, counter
        while time.perf_counter() < stop:
            counter += 1
            n = counter
            jti, ip, sub = f"tok-{n % 200}", f"10.0.{n % 7}.{n % 50}", f"u_{n % 100}"
            started = time.perf_counter()
            decision = await admission.check(
                limits=[
                    Limit("per-token", jti, 10**6, 60.0),
                    Limit("per-ip", ip, 10**6, 60.0),
                    Limit("per-user", sub, 10**6, 60.0),
                ],
                client_ip=ip,
                nonce=f"{jti}:{tag}-{n}",
                nonce_ttl_s=60,
                revoked_token_id=jti,
                revoked_user=(sub, 1),
            )
            latencies.append(time.perf_counter() - started)
            refused += not decision.allowed

    began, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(caller(w) for w in range(CONCURRENCY)))
    elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    latencies.sort()
    return {
        "checks_per_s": round(len(latencies) / elapsed),
        # the client's CPU per check: steadier than throughput on a shared machine
        "cpu_us_per_check": round(cpu / len(latencies) * 1e6, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 3),
        "refused": refused,
    }


async def run(topologies: dict[str, RedisTopology], seconds: float) -> dict[str, Any]:
    best: dict[str, dict[str, float]] = {}
    for round_ in range(2):
        for name, topology in topologies.items():
            client = connect(topology)
            admission = Admission(client, service="bench", pipelined=True)
            try:
                await drive(admission, 0.3, f"warm{round_}")
                result = await drive(admission, seconds, f"r{round_}")
            finally:
                await admission.aclose()
                await client.aclose()
            if name not in best or result["checks_per_s"] > best[name]["checks_per_s"]:
                best[name] = result
    base = best["standalone"]["checks_per_s"]
    for name, result in best.items():
        result["vs_standalone"] = round(result["checks_per_s"] / base, 3)
        print(
            f"{name:>10}: {result['checks_per_s']:>7} checks/s  p50 {result['p50_ms']:.2f} ms  "
            f"p99 {result['p99_ms']:.2f} ms  client CPU {result['cpu_us_per_check']:.0f} us/check  "
            f"({result['vs_standalone']:.0%} of standalone)"
        )
    return {"concurrency": CONCURRENCY, "seconds": seconds, "topologies": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0)
    add_json_option(parser)
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="keyveil-topology-bench-"))
    standalone = start_redis(state, name="standalone")
    sentinel = start_redis_sentinel(state)
    cluster = start_redis_cluster(state, replicas=0)
    try:
        topologies = {
            "standalone": RedisTopology(standalone.url),
            "sentinel": RedisTopology(
                sentinel.master.url,
                sentinels=tuple(("127.0.0.1", s.port) for s in sentinel.sentinels),
                sentinel_master=sentinel.name,
            ),
            "cluster": RedisTopology(cluster.url, cluster=True),
        }
        write_json(args.json, asyncio.run(run(topologies, args.seconds)))
    finally:
        cluster.stop()
        sentinel.stop()
        standalone.stop()


if __name__ == "__main__":
    main()
