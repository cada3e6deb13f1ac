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
    ("proxy", "benchmarks.proxy_bench", "--requests 3000"),
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


def run_all(only: set[str] | None) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="keyveil-report-") as tmp:
        for name, module, args in RUNS:
            if only and name not in only:
                continue
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
        clients = sorted(proxy["added_ms"], key=int)
        _grouped_bars(
            OUT / "proxy_added_latency.png",
            "Proxy overhead over a direct upstream call",
            "added latency (ms)",
            [f"{c} client(s)" for c in clients],
            {q: [proxy["added_ms"][c][q] for c in clients] for q in ("p50", "p99")},
        )
        levels = sorted(proxy["throughput"], key=int)
        _grouped_bars(
            OUT / "proxy_throughput.png",
            "Throughput, one proxy worker, all checks on",
            "requests / s",
            [f"{c} clients" for c in levels],
            {
                "direct to upstream": [proxy["direct"][c]["rate_per_s"] for c in levels],
                "through the proxy": [proxy["throughput"][c]["rate_per_s"] for c in levels],
            },
        )
        made += ["proxy_added_latency.png", "proxy_throughput.png"]
    rates = {
        "token issuance": results.get("token", {}).get("rate_per_s"),
        "key leases": results.get("lease", {}).get("rate_per_s"),
        "auditor events": results.get("auditor", {}).get("events_per_s"),
    }
    present = {k: float(v) for k, v in rates.items() if v}
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


def markdown(results: dict[str, Any], host: dict[str, str], images: list[str]) -> str:
    lines = [
        "# keyveil benchmark report",
        "",
        f"Written by `make bench` ({host['date']}) on {host['cpu']}, {host['cores']} cores, "
        f"Python {host['python']}, {host['system']} (load average before the run: "
        f"{host['load_before']}). Every number comes from this one run against the",
        "OpenAI-compatible fake upstream on the same machine; rerun `make bench` to reproduce.",
        "",
    ]
    proxy = results.get("proxy")
    if proxy:
        lines += [
            "## Proxy (one worker; token, signature, digest, nonce, rate limit, usage event on)",
            "",
            "| clients | direct p50 / p99 ms | proxy p50 / p99 ms | added p50 / p99 ms |",
            "|---|---|---|---|",
        ]
        for c in sorted(proxy["added_ms"], key=int):
            d, p, a = proxy["direct"][c], proxy["latency"][c], proxy["added_ms"][c]
            lines.append(
                f"| {c} | {d['p50_ms']:.2f} / {d['p99_ms']:.2f} | {p['p50_ms']:.2f} / "
                f"{p['p99_ms']:.2f} | {a['p50']:.2f} / {a['p99']:.2f} |"
            )
        lines += [
            "",
            "| clients | direct req/s | proxy req/s | proxy / direct |",
            "|---|---|---|---|",
        ]
        for c in sorted(proxy["throughput"], key=int):
            d, p = proxy["direct"][c]["rate_per_s"], proxy["throughput"][c]["rate_per_s"]
            lines.append(f"| {c} | {d:,.0f} | {p:,.0f} | {p / d:.2f} |")
        lines += [
            "",
            "Targets: added p50 <= 1 ms and p99 <= 5 ms at one client; >= 2,000 req/s per worker.",
            "",
        ]
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
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    host = machine()
    results = run_all(set(args.only) if args.only else None)
    (OUT / "results.json").write_text(json.dumps({"machine": host, **results}, indent=2) + "\n")
    images = plots(results)
    (OUT / "README.md").write_text(markdown(results, host, images))
    print(f"wrote {OUT / 'README.md'}")


if __name__ == "__main__":
    main()
