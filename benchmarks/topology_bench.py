"""Admission throughput per Redis topology: standalone vs Sentinel vs Cluster.

Starts real valkey servers (keyveil.servers): one standalone server, a Sentinel set (1
master, 1 replica, 3 sentinels) and a 3-master cluster, then drives one `Admission`
(pipelined, as the proxy builds it) per topology with CONCURRENCY concurrent callers doing
the proxy's check (IP block, token revocation, nonce, user revocation, per-token, per-ip
and per-user layers over many subjects: three slot groups on the cluster). Phases
alternate twice and the better of each is kept, to damp a shared machine's noise.

With `--proxy` it also runs one proxy worker per topology (REDIS_CLUSTER /
REDIS_SENTINELS set as a deployment would) behind proxy_bench's load generator
(16 keep-alive clients) and reports requests/s and the proxy's CPU per request: the
number the "within 15 % of standalone" target is about.

    .venv/bin/python -m benchmarks.topology_bench [--seconds 3] [--proxy] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
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


def _topology_env(topology: RedisTopology) -> dict[str, str]:
    env = {"REDIS_URL": topology.url}
    if topology.cluster:
        env["REDIS_CLUSTER"] = "true"
    if topology.sentinels:
        env["REDIS_SENTINELS"] = ",".join(f"{h}:{p}" for h, p in topology.sentinels)
        env["REDIS_SENTINEL_MASTER"] = topology.sentinel_master or ""
    return env


async def proxy_run(
    topologies: dict[str, RedisTopology], state: Path, requests: int
) -> dict[str, Any]:
    """One proxy worker per topology, the same load; the better of two phases each."""
    from benchmarks.proxy_bench import (
        KEK_SECRET,
        PROVIDER_KEY,
        SIGNING_KEY,
        Bench,
        start_service,
        wait_ready,
    )
    from keyveil.servers import free_port, start_fake_upstream, start_nats

    nats_server = start_nats(state, name="bench-nats", streams=True)
    fake = start_fake_upstream(state)
    up_port = fake.port
    processes: list[subprocess.Popen[bytes]] = []
    out: dict[str, Any] = {}
    try:
        km_port = free_port()
        km_env = {
            "NATS_URL": nats_server.url,
            "KEY_ENCRYPTION_SECRET": KEK_SECRET,
            "OPENAI_API_KEY": PROVIDER_KEY,
        }
        processes.append(start_service("keymanager", km_env, km_port, state / "km.log"))
        await wait_ready(km_port)
        proxies: dict[str, tuple[int, int]] = {}
        for name, topology in topologies.items():
            port = free_port()
            env = {
                "NATS_URL": nats_server.url,
                "PROXY_SIGNING_KEY": SIGNING_KEY,
                "OPENAI_BASE_URL": f"http://127.0.0.1:{up_port}/v1",
                "VOICE_AGENT_PROXY_RATE_LIMIT": "1000000",
                "VOICE_AGENT_PROXY_IP_RATE_LIMIT": "10000000",
                **_topology_env(topology),
            }
            proxy = start_service("proxy", env, port, state / f"proxy-{name}.log")
            processes.append(proxy)
            await wait_ready(port)
            proxies[name] = (port, proxy.pid)
        for _ in range(2):
            for name, (port, pid) in proxies.items():
                phase = await Bench(port, up_port, {"proxy": [pid]}).proxy_phase(16, requests)
                result = {
                    "rate_per_s": round(phase.rps, 1),
                    "proxy_cpu_us": round(1e6 * phase.cpu_s["proxy"] / phase.requests, 1),
                }
                if name not in out or result["proxy_cpu_us"] < out[name]["proxy_cpu_us"]:
                    out[name] = result
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(15)
        fake.stop()
        nats_server.stop()
    base = out["standalone"]["proxy_cpu_us"]
    for name, result in out.items():
        result["cpu_vs_standalone"] = round(result["proxy_cpu_us"] / base, 3)
        print(
            f"proxy on {name:>10}: {result['rate_per_s']:>7} req/s, "
            f"{result['proxy_cpu_us']:.0f} us proxy CPU per request "
            f"({result['cpu_vs_standalone']:.0%} of standalone)"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--proxy", action="store_true", help="also through a proxy worker")
    parser.add_argument("--requests", type=int, default=3000, help="proxy requests per phase")
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
        results = asyncio.run(run(topologies, args.seconds))
        if args.proxy:
            results["proxy"] = asyncio.run(proxy_run(topologies, state, args.requests))
        write_json(args.json, results)
    finally:
        cluster.stop()
        sentinel.stop()
        standalone.stop()


if __name__ == "__main__":
    main()
