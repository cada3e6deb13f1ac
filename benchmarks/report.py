"""`make bench`: every benchmark in one run, written up under docs/benchmarks/.

Runs the scripts one after another on this machine (each starts its own real servers
and processes), collects their `--json` output, and writes a markdown report with the
machine it ran on and PNG plots. Numbers on a shared 2-core machine are noisy: the
report states ratios measured within one run (proxy against a direct call to the same
upstream), not absolute promises.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "benchmarks"

# (name, module, arguments): the sizes keep the whole run to a few minutes here.
RUNS: tuple[tuple[str, str, str], ...] = (
    ("proxy", "benchmarks.proxy_bench", "--requests 3000 --profile docs/benchmarks"),
    ("proxy-granian", "benchmarks.proxy_bench", "--requests 3000 --server granian"),
    ("proxy-rediss", "benchmarks.proxy_bench", "--requests 3000 --rediss"),
    ("proxy-2-workers", "benchmarks.proxy_bench", "--requests 3000 --workers 2"),
    ("token", "benchmarks.token_bench", "--requests 2000 --concurrency 16 --replicas 1"),
    ("lease", "benchmarks.lease_bench", "--leases 2000 --concurrency 16"),
    ("kek", "benchmarks.kek_bench", "--leases 1500 --concurrency 16 --rounds 2"),
    ("auditor", "benchmarks.auditor_bench", "--events 20000 --bursts 10"),
    ("ratelimit", "benchmarks.ratelimit_bench", "--replicas 3 --limit 50 --requests 300"),
    ("voice", "benchmarks.voice_bench", "--sessions 200 --sidebands 1000"),
)


def machine() -> dict[str, str]:
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def run_all(only: set[str] | None, *, peers: bool = False) -> dict[str, Any]:
    """Run the benchmarks (`only` these); `peers` adds LiteLLM to the main proxy run."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="keyveil-report-") as tmp:
        for name, module, args in RUNS:
            if only and name not in only:
                continue
            if peers and name == "proxy":
                args += " --peers"
            path = Path(tmp) / f"{name}.json"
            print(f"== {name}: python -m {module} {args}", flush=True)
            done = subprocess.run(  # noqa: S603
                [sys.executable, "-m", module, *args.split(), "--json", str(path)],
                cwd=REPO,
                check=False,
            )
            if done.returncode != 0 or not path.exists():
                raise SystemExit(f"benchmark {name} failed (exit {done.returncode})")
            results[name] = json.loads(path.read_text())
    return results


def _grouped_bars(
    path: Path, title: str, ylabel: str, labels: list[str], series: dict[str, list[float]]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * width
        ax.bar([x + offset for x in range(len(labels))], values, width, label=name)
    ax.set_xticks(list(range(len(labels))), labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plots(results: dict[str, Any]) -> list[str]:
    made: list[str] = []
    proxy = results.get("proxy")
    if proxy:
        levels = sorted(proxy["levels"], key=int)
        rows = [proxy["levels"][c] for c in levels]
        added = {"keyveil p50": [r["added"]["p50"] for r in rows]}
        added["keyveil p99"] = [r["added"]["p99"] for r in rows]
        if all("peer" in r for r in rows):
            added["LiteLLM p50"] = [r["peer_added"]["p50"] for r in rows]
        _grouped_bars(
            OUT / "proxy_added_latency.png",
            "Added latency over a direct upstream call",
            "added latency (ms)",
            [f"{c} client(s)" for c in levels],
            added,
        )
        rates = {"direct to upstream": [r["direct"]["rate_per_s"] for r in rows]}
        rates["through keyveil"] = [r["proxy"]["rate_per_s"] for r in rows]
        if all("peer" in r for r in rows):
            rates["through LiteLLM"] = [r["peer"]["rate_per_s"] for r in rows]
        _grouped_bars(
            OUT / "proxy_throughput.png",
            "Throughput, one proxy worker, all checks on",
            "requests / s",
            [f"{c} clients" for c in levels],
            rates,
        )
        made += ["proxy_added_latency.png", "proxy_throughput.png"]
    service = {
        "token issuance": results.get("token", {}).get("rate_per_s"),
        "key leases": results.get("lease", {}).get("rate_per_s"),
        "auditor events": results.get("auditor", {}).get("events_per_s"),
    }
    present = {k: float(v) for k, v in service.items() if v}
    if present:
        _grouped_bars(
            OUT / "service_rates.png",
            "Service rates",
            "per second",
            list(present),
            {"measured": list(present.values())},
        )
        made.append("service_rates.png")
    return made


def _variant(run: dict[str, Any]) -> str:
    return f"{run['workers']} worker(s), {run['server']}, Redis over " + (
        "TLS (rediss://)" if run["redis"] == "rediss" else "TCP"
    )


def proxy_section(results: dict[str, Any]) -> list[str]:
    """Added latency at 1/4/16/64 clients (direct vs gateway), CPU per request, targets."""
    proxy = results.get("proxy")
    if not proxy or "levels" not in proxy:  # absent, or a results.json from before levels
        return []
    levels = sorted(proxy["levels"], key=int)
    peers = all("peer" in proxy["levels"][c] for c in levels)
    lines = [
        "## Proxy: added latency over a direct call (every check on)",
        "",
        "Checks: token, signature + Content-Digest, nonce, rate limits (token, IP, user), "
        "revocation and IP block (one Redis round trip), a usage event on JetStream per "
        f"request. Main run: {_variant(proxy)}. Each level is direct to the fake "
        "upstream, then through the gateway, in the same run; added = gateway - direct.",
        "",
        "| clients | direct p50 / p99 ms | keyveil p50 / p99 ms | **added p50 / p99 ms** | "
        "keyveil req/s | keyveil CPU us/req |"
        + (" LiteLLM added p50 / p99 ms | LiteLLM req/s | keyveil / LiteLLM |" if peers else ""),
        "|---|---|---|---|---|---|" + ("---|---|---|" if peers else ""),
    ]
    for c in levels:
        row = proxy["levels"][c]
        d, p, a = row["direct"], row["proxy"], row["added"]
        line = (
            f"| {c} | {d['p50_ms']:.2f} / {d['p99_ms']:.2f} | {p['p50_ms']:.2f} / "
            f"{p['p99_ms']:.2f} | **{a['p50']:.2f} / {a['p99']:.2f}** | "
            f"{p['rate_per_s']:,.0f} | {row['cpu']['proxy_us']:.0f} |"
        )
        if peers:
            pa = row["peer_added"]
            line += (
                f" {pa['p50']:.2f} / {pa['p99']:.2f} | {row['peer']['rate_per_s']:,.0f} | "
                f"{row['ratio']:.1f}x |"
            )
        lines.append(line)
    cpu = proxy["levels"]["16"]["cpu"] if "16" in proxy["levels"] else None
    if cpu:
        used = ", ".join(f"{k[:-3]} {v:.0f}" for k, v in cpu.items() if k.endswith("_us"))
        lines += ["", f"CPU per proxied request at 16 clients (us, every process): {used}."]
    costs = proxy.get("per_request")
    if costs:
        lines += [
            "",
            f"Per proxied request, read from the servers after the run "
            f"({costs['proxied_requests']:,} requests): {costs['redis_round_trips']} Redis "
            f"round trips running {costs['redis_script_commands']} commands, "
            f"{costs['jetstream_messages']} JetStream messages, "
            f"{costs['jetstream_bytes']:.0f} stored bytes (the inputs of "
            "[capacity.md](../capacity.md)).",
        ]
    variants = [(n, results[n]) for n in sorted(results) if n.startswith("proxy-")]
    if variants:
        lines += [
            "",
            "Variants (separate runs of the same benchmark):",
            "",
            "| run | added p50 / p99 ms at 1 client | req/s at 16 | req/s at 64 | "
            "CPU us/req at 16 | load (1 min) at its end |",
            "|---|---|---|---|---|---|",
        ]
        for _, run in [("proxy", proxy), *variants]:
            one, sixteen = run["levels"]["1"], run["levels"]["16"]
            lines.append(
                f"| {_variant(run)} | {one['added']['p50']:.2f} / "
                f"{one['added']['p99']:.2f} | {sixteen['proxy']['rate_per_s']:,.0f} | "
                f"{run['levels']['64']['proxy']['rate_per_s']:,.0f} | "
                f"{sixteen['cpu']['proxy_us']:.0f} | "
                f"{run.get('machine', {}).get('load_avg_1m', 0):.1f} |"
            )
    lines += ["", "Targets (main run; one run on this machine, so indicative):", ""]
    for target in proxy["targets"]:
        met = target["met"]
        word = (
            "not measured (run `make bench-peers`)"
            if met is None
            else ("**met**" if met else "**missed**")
        )
        lines.append(f"- {target['target']}: {word}, measured {target['measured']}")
    if (OUT / "proxy_profile.md").exists():
        lines += ["", "Where the time goes: [proxy_profile.md](proxy_profile.md) (py-spy)."]
    return [*lines, ""]


def markdown(results: dict[str, Any], host: dict[str, str], images: list[str]) -> str:
    lines = [
        "# keyveil benchmark report",
        "",
        f"Written by `make bench` ({host['date']}) on {host['cpu']}, {host['cores']} cores, "
        f"Python {host['python']}, {host['system']} (load average before the run: "
        f"{host['load_before']}). Every number comes from a run against the",
        "OpenAI-compatible fake upstream on the same machine; rerun `make bench` to reproduce.",
        "",
    ]
    if host.get("partial"):
        lines += [
            f"This was a partial run (`--only {host['partial']}`); the other sections are "
            "kept from the previous run.",
            "",
        ]
    lines += proxy_section(results)
    if "token" in results:
        t = results["token"]
        lines += [
            "## Token service (proxy-token issuance, rate limiting on)",
            "",
            f"{t['rate_per_s']:,.0f} tokens/s with {t['concurrency']} clients on "
            f"{t['replicas']} replica(s); p50 {t['p50_ms']:.2f} ms, p99 {t['p99_ms']:.2f} ms.",
            "",
        ]
    if "lease" in results:
        lease = results["lease"]
        lines += [
            "## Key leases (NATS request/reply, HPKE-sealed, audit event each)",
            "",
            f"{lease['rate_per_s']:,.0f} leases/s with {lease['concurrency']} clients "
            f"({lease['kem']}); p50 {lease['p50_ms']:.2f} ms, p99 {lease['p99_ms']:.2f} ms. "
            "Proxies cache leases, so this is far above what they ask for.",
            "",
        ]
    if "kek" in results:
        k = results["kek"]
        local, vault = k["local"], k["vault-transit"]
        lines += [
            "## Leases by KEK provider (data keys cached in the key-manager)",
            "",
            f"local {local['rate_per_s']:,.0f} leases/s (p99 {local['p99_ms']:.2f} ms), "
            f"vault-transit on OpenBao {vault['rate_per_s']:,.0f} leases/s "
            f"(p99 {vault['p99_ms']:.2f} ms): ratio {k['ratio']:.2f}, best of interleaved "
            "rounds. Only a cache miss (every KEK_CACHE_TTL_S) reaches OpenBao.",
            "",
        ]
    if "auditor" in results:
        a = results["auditor"]
        lines += [
            "## Auditor",
            "",
            f"{a['events_per_s']:,.0f} usage events/s draining a backlog of {a['events']:,}; "
            f"attack burst to alert on the bus: median {a['alert_latency_median_ms']:.1f} ms, "
            f"max {a['alert_latency_max_ms']:.1f} ms.",
            "",
        ]
    if "ratelimit" in results:
        r = results["ratelimit"]
        lines += [
            "## Rate-limit accuracy across proxy replicas",
            "",
            f"{r['replicas']} proxy replicas, one token, limit {r['limit']} per minute, "
            f"{r['requests']} concurrent requests over {r['seconds']:.2f} s: "
            f"**{r['allowed']} allowed** (ceiling with GCRA refill during the run: "
            f"{r['ceiling']}), {r['limited']} refused with 429, {r['other']} other.",
            "",
        ]
    if "voice" in results:
        v, held = results["voice"]["setup"], results["voice"]["sidebands"]
        lines += [
            "## Voice sessions (GPT-Live set-up through the broker; sidebands held)",
            "",
            f"Set-up over {v['sessions']} sessions, each side: direct to the fake "
            f"p50 {v['direct_p50_ms']:.2f} / p99 {v['direct_p99_ms']:.2f} ms, through the "
            f"proxy p50 {v['proxy_p50_ms']:.2f} / p99 {v['proxy_p99_ms']:.2f} ms: **added p50 "
            f"{v['added_p50_ms']:.2f} ms, p99 {v['added_p99_ms']:.2f} ms** (the proxy's own "
            f"metrics: {v['in_proxy_mean_ms']:.2f} ms mean besides the upstream call).",
            "",
            f"One proxy worker held **{held['attached']} of {held['requested']}** sidebands at "
            f"once, **{held['kib_per_sideband']} KiB each** (RSS {held['rss_before_kib']} -> "
            f"{held['rss_after_kib']} KiB), stayed ready, and exited "
            f"{held['shutdown_s_holding']} s after SIGTERM while holding them.",
            "",
            "Targets: added set-up p50 <= 5 ms, p99 <= 20 ms; >= 1,000 sidebands per worker "
            "under 64 KiB each.",
            "",
        ]
    lines += [f"![{name}]({name})" for name in images]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", nargs="*", help="run only these (proxy token lease ...)")
    parser.add_argument("--peers", action="store_true", help="LiteLLM in the proxy run too")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite README.md from results.json"
    )
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    previous = OUT / "results.json"
    if args.render:
        stored = json.loads(previous.read_text())
        host = stored.pop("machine")
        (OUT / "README.md").write_text(markdown(stored, host, plots(stored)))
        print(f"wrote {OUT / 'README.md'}")
        return
    host = machine()
    if args.only:
        host["partial"] = " ".join(args.only)
    results = run_all(set(args.only) if args.only else None, peers=args.peers)
    if args.only and previous.exists():
        # A partial run keeps the other sections of the last full one.
        kept = json.loads(previous.read_text())
        kept.pop("machine", None)
        results = {**{k: v for k, v in kept.items() if k not in results}, **results}
    (OUT / "results.json").write_text(json.dumps({"machine": host, **results}, indent=2) + "\n")
    images = plots(results)
    (OUT / "README.md").write_text(markdown(results, host, images))
    print(f"wrote {OUT / 'README.md'}")


if __name__ == "__main__":
    main()
