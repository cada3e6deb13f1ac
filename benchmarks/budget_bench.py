"""Budget benchmark: proxy throughput with budgets on vs off, same machine, same run.

Starts real NATS and Redis, the fake upstream, the key manager and TWO proxy workers:
one without budgets, one with KEYVEIL_BUDGETS=true and two budgets that apply to every
call (a global micro-dollar budget per day and a per-token TPM), so each call reserves
in its admission round trip and settles after (in batches). Both are driven by
proxy_bench's load generator (16 keep-alive clients, requests signed ahead of the
clock); the phases alternate off/on `--rounds` times and the better of each is kept,
to damp the noise of a shared machine. Also printed: the CPU every process spent per
request (off/on: what the throughput ratio is on a machine the bench has to itself)
and the Redis script calls and server time per request.

    .venv/bin/python -m benchmarks.budget_bench [--requests 2000] [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
from pathlib import Path

import redis as sync_redis

from benchmarks.proxy_bench import (
    KEK_SECRET,
    PROVIDER_KEY,
    SIGNING_KEY,
    Bench,
    _pid,
    family,
    start_service,
    wait_ready,
)
from keyveil.servers import free_port, start_fake_upstream, start_nats, start_redis
from shared.budgets import CONFIG_KEY, INDEX_FIELD, budget_field

CLIENTS = 16


def _reset_stats(store: sync_redis.Redis) -> None:
    store.config_resetstat()


def _script_calls(store: sync_redis.Redis) -> tuple[int, int]:
    """Script calls since the last reset, and the microseconds Redis spent in them."""
    stats: dict[str, dict[str, float]] = store.info("commandstats")
    found = [stats.get(f"cmdstat_{name}", {}) for name in ("evalsha", "eval")]
    return int(sum(s.get("calls", 0) for s in found)), int(sum(s.get("usec", 0) for s in found))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="requests per phase")
    parser.add_argument("--rounds", type=int, default=3, help="off/on phase pairs")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="keyveil-budget-bench-"))
    nats_server = start_nats(state, streams=True)
    redis_server = start_redis(state)
    fake = start_fake_upstream(state)
    up_port = fake.port
    store = sync_redis.Redis.from_url(redis_server.url)
    store.hset(CONFIG_KEY, budget_field("global", "all", "micros", "day"), 10**15)
    store.hset(CONFIG_KEY, budget_field("token", "*", "tokens", "minute"), 10**12)
    store.hset(CONFIG_KEY, INDEX_FIELD, "global:micros:day,token:tokens:minute")  # as BudgetAdmin
    processes: list[subprocess.Popen[bytes]] = []
    try:
        km_port = free_port()
        km_env = {
            "NATS_URL": nats_server.url,
            "KEY_ENCRYPTION_SECRET": KEK_SECRET,
            "OPENAI_API_KEY": PROVIDER_KEY,
        }
        processes.append(start_service("keymanager", km_env, km_port, state / "km.log"))
        await wait_ready(km_port)
        base = {
            "NATS_URL": nats_server.url,
            "REDIS_URL": redis_server.url,
            "PROXY_SIGNING_KEY": SIGNING_KEY,
            "OPENAI_BASE_URL": f"http://127.0.0.1:{up_port}/v1",
            "VOICE_AGENT_PROXY_RATE_LIMIT": "1000000",
            "VOICE_AGENT_PROXY_IP_RATE_LIMIT": "10000000",
        }
        ports = {"off": free_port(), "on": free_port()}
        proxies = {
            "off": start_service("proxy", base, ports["off"], state / "proxy-off.log"),
            "on": start_service(
                "proxy", {**base, "KEYVEIL_BUDGETS": "true"}, ports["on"], state / "proxy-on.log"
            ),
        }
        processes.extend(proxies.values())
        for port in ports.values():
            await wait_ready(port)
        best: dict[str, float] = {"off": 0.0, "on": 0.0}
        p50: dict[str, float] = {}
        cpu_us: dict[str, dict[str, float]] = {}
        scripts: dict[str, dict[str, float]] = {}
        for _ in range(args.rounds):
            for mode in ("off", "on"):
                pids = {
                    "proxy": family(proxies[mode].pid),
                    "upstream": [_pid(fake)],
                    "redis": [_pid(redis_server)],
                }
                bench = Bench(ports[mode], up_port, pids)
                phase = await bench.proxy_phase(CLIENTS, args.requests, lambda: _reset_stats(store))
                calls = _script_calls(store)
                if phase.rps > best[mode]:
                    best[mode] = phase.rps
                    p50[mode] = phase.pct(0.5)
                    cpu_us[mode] = {
                        name: round(1e6 * sec / phase.requests, 1)
                        for name, sec in phase.cpu_s.items()
                    }
                    scripts[mode] = {
                        "calls_per_request": round(calls[0] / phase.requests, 3),
                        "server_us_per_request": round(calls[1] / phase.requests, 1),
                    }
        ratio = best["on"] / best["off"]
        # Every process shares the same cores: throughput follows the CPU all of them
        # spend per request, which a loaded machine disturbs less than the request rate.
        cpu_total = {mode: sum(cpu_us[mode].values()) for mode in ("off", "on")}
        cpu_ratio = cpu_total["off"] / cpu_total["on"]
        results = {
            "rps_budgets_off": round(best["off"], 1),
            "rps_budgets_on": round(best["on"], 1),
            "p50_ms_budgets_off": round(p50["off"], 3),
            "p50_ms_budgets_on": round(p50["on"], 3),
            "on_over_off": round(ratio, 3),
            "cpu_off_over_on": round(cpu_ratio, 3),
            "cpu_us_per_request": cpu_us,
            "redis_scripts": scripts,
            "clients": CLIENTS,
            "requests_per_phase": args.requests,
            "machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
        }
        print(
            f"budgets off: {best['off']:.0f} req/s (p50 {p50['off']:.2f} ms); "
            f"on: {best['on']:.0f} req/s (p50 {p50['on']:.2f} ms); on/off = {ratio:.3f} "
            f"({CLIENTS} clients, {args.requests} requests per phase, load "
            f"{os.getloadavg()[0]:.2f})"
        )
        print(
            f"  CPU per request, every process: off {cpu_total['off']:.0f} us, on "
            f"{cpu_total['on']:.0f} us; off/on = {cpu_ratio:.3f}"
        )
        for mode in ("off", "on"):
            print(f"  CPU per request, budgets {mode}: {cpu_us[mode]} (microseconds)")
            print(f"  Redis scripts per request, budgets {mode}: {scripts[mode]}")
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    finally:
        store.close()
        for process in reversed(processes):
            process.terminate()
            process.wait(15)
        fake.stop()
        redis_server.stop()
        nats_server.stop()


if __name__ == "__main__":
    asyncio.run(main())
