"""Every service that exists, run as a real process, scraped: metric names follow
keyveil_<service>_ with units, and no label value is an IP, a token, a JWT or a key."""

from __future__ import annotations

import asyncio
import ipaddress
import math
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from keyveil.servers import ServerProcess, start_nats
from tests.support import (
    REPO,
    TEST_KEY_ENCRYPTION_SECRET,
    TEST_PROVIDER_KEY,
    TEST_PROXY_SIGNING_KEY,
    FakeUpstream,
    ServiceProcess,
)

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

START_ORDER = ("keymanager", "token", "proxy", "auditor")
SERVICES = [name for name in START_ORDER if (REPO / "services" / name / "__main__.py").exists()]
# Families several services share, named by the shared idea rather than one service.
SHARED_PREFIXES = (
    "keyveil_events_",
    "keyveil_ratelimit_",
    "keyveil_auth_",
    "keyveil_bus_",
    "keyveil_stream_",
    "keyveil_http_",
    "keyveil_build_",  # keyveil_build_info{service,version,python}, the usual build-info name
    "keyveil_policy_",  # shared/policy.py, labelled by service
    "keyveil_voice_",  # the voice broker (shared.voicesessions and the proxy's sidebands)
    "keyveil_usage_",  # shared/metering.py: provider-reported usage and cost, model x app
    "keyveil_budget_",  # shared/budgets.py
)
DEFAULT_COLLECTORS = ("python_", "process_")
TIME_WORDS = re.compile(r"(latency|duration|_age|_time|delay|_lag|elapsed|uptime)")
SIZE_WORDS = re.compile(r"(_size|_length|body|payload)")
UNITS = ("_seconds", "_bytes", "_ratio", "_tokens", "_requests", "_messages", "_events")

IP_LIKE = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$|^[0-9a-fA-F:]*:[0-9a-fA-F:]+$")
SECRET_LIKE = re.compile(r"(sk-|ek_|eyJ|Bearer |sig1=)")
ID_LIKE = re.compile(r"^[0-9a-f]{16,}$|^[0-9a-f]{8}-[0-9a-f]{4}-|^[A-Za-z0-9_\-]{24,}$")


def suspicious_label_value(value: str) -> str | None:
    if IP_LIKE.match(value):
        try:
            ipaddress.ip_address(value)
            return "an IP address"
        except ValueError:
            pass
    if SECRET_LIKE.search(value):
        return "a secret or token"
    if ID_LIKE.match(value) and not value.isalpha() and "_" not in value.strip("_"):
        return "an identifier (token/key/request id)"
    return None


def check_exposition(service: str, text: str) -> list[str]:
    problems: list[str] = []
    for family in text_string_to_metric_families(text):
        name = family.name
        if name.startswith(DEFAULT_COLLECTORS) or name.endswith("_created"):
            continue  # _created: prometheus_client's creation-time series of a family
        if not name.startswith((f"keyveil_{service}_", *SHARED_PREFIXES)):
            problems.append(f"{service}: {name} is not keyveil_{service}_... or a shared family")
        if (
            family.type == "counter"
            and family.samples
            and not any(s.name.endswith(("_total", "_created")) for s in family.samples)
        ):
            problems.append(f"{service}: counter {name} has no _total sample")
        if TIME_WORDS.search(name) and not name.endswith(("_seconds", "_timestamp_seconds")):
            problems.append(f"{service}: {name} measures time but is not in _seconds")
        if SIZE_WORDS.search(name) and not name.endswith(("_bytes", "_total")):
            problems.append(f"{service}: {name} measures size but is not in _bytes")
        if family.type in ("histogram", "summary") and not name.endswith(UNITS):
            problems.append(f"{service}: histogram {name} has no unit suffix")
        for sample in family.samples:
            for label, value in sample.labels.items():
                if label in ("le", "quantile"):
                    continue
                why = suspicious_label_value(value)
                if why:
                    problems.append(f"{service}: {sample.name}{{{label}=...}} looks like {why}")
            if not math.isfinite(sample.value) and not sample.name.endswith("_bucket"):
                problems.append(f"{service}: {sample.name} is {sample.value}")
    return problems


def test_the_checker_catches_what_it_must() -> None:
    bad = "\n".join(
        [
            "# TYPE keyveil_proxy_requests_total counter",
            'keyveil_proxy_requests_total{client="203.0.113.9"} 1',
            'keyveil_proxy_requests_total{token="eyJhbGciOi.eyJzdWIi.c2ln"} 1',
            'keyveil_proxy_requests_total{key="3f2a9c0d1e4b5a6978877665544332211"} 1',
            "# TYPE keyveil_proxy_upstream_latency gauge",
            "keyveil_proxy_upstream_latency 0.2",
            "# TYPE myapp_requests_total counter",
            "myapp_requests_total 1",
        ]
    )
    problems = check_exposition("proxy", bad + "\n")
    assert any("IP address" in p for p in problems)
    assert any("secret or token" in p for p in problems)
    assert any("identifier" in p for p in problems)
    assert any("_seconds" in p for p in problems)
    assert any("myapp_requests " in p for p in problems)
    good = (
        "# TYPE keyveil_proxy_rejections_total counter\n"
        'keyveil_proxy_rejections_total{reason="rate_limited"} 3\n'
        "# TYPE keyveil_auditor_events_processed_total counter\n"
        'keyveil_auditor_events_processed_total{stream="KEYVEIL_USAGE"} 3\n'
    )
    assert check_exposition("proxy", good.replace("auditor", "proxy")) == []


@pytest.fixture
def stack(
    tmp_path: Path, redis_url: str, fake_upstream: FakeUpstream
) -> Iterator[dict[str, ServiceProcess]]:
    nats_server: ServerProcess = start_nats(tmp_path, streams=True)
    env = {
        "NATS_URL": nats_server.url,
        "REDIS_URL": redis_url,
        "PROXY_SIGNING_KEY": TEST_PROXY_SIGNING_KEY,
        "KEY_ENCRYPTION_SECRET": TEST_KEY_ENCRYPTION_SECRET,
        "OPENAI_API_KEY": TEST_PROVIDER_KEY,
        "OPENAI_BASE_URL": fake_upstream.base_url,
        "ALLOWED_ORIGINS": "http://localhost:3000",
    }
    running: dict[str, ServiceProcess] = {}
    try:
        for name in SERVICES:
            service = ServiceProcess(name, env=dict(env), log_path=tmp_path / f"{name}.log")
            running[name] = service.start(timeout=40)
        yield running
    finally:
        for service in reversed(running.values()):
            service.stop()
        nats_server.stop()


def test_every_service_exposes_well_named_bounded_metrics(
    stack: dict[str, ServiceProcess],
) -> None:
    assert "auditor" in stack
    # A little traffic, including refusals, so labelled series exist to inspect.
    headers = {"Origin": "http://localhost:3000", "X-Forwarded-For": "203.0.113.77"}
    if "token" in stack:
        for body in ({"mode": "proxy"}, {"mode": "nonsense"}, {}):
            httpx.post(
                f"{stack['token'].url}/api/voice-agent/secure-token",
                json=body,
                headers=headers,
                timeout=10,
            )
    if "proxy" in stack:
        for auth in ("", "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"):
            httpx.post(
                f"{stack['proxy'].url}/api/voice-agent/proxy/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": []},
                headers={**headers, "Authorization": auth},
                timeout=10,
            )
    problems: list[str] = []
    for name, service in stack.items():
        answer = httpx.get(f"{service.url}/metrics", timeout=10)
        assert answer.status_code == 200, name
        assert answer.headers["content-type"].startswith("text/plain")
        families = {f.name for f in text_string_to_metric_families(answer.text)}
        assert any(f.startswith(f"keyveil_{name}_") for f in families), (name, families)
        problems.extend(check_exposition(name, answer.text))
        for probe in ("/healthz", "/readyz"):
            assert httpx.get(f"{service.url}{probe}", timeout=10).status_code == 200
    assert problems == [], "\n".join(problems)
    for service in stack.values():
        assert TEST_PROVIDER_KEY not in service.log()
        assert TEST_PROXY_SIGNING_KEY not in service.log()


async def test_multiprocess_metrics_mode(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR set (uvicorn workers > 1), /metrics aggregates the
    per-process files rather than one worker's registry."""
    import nats

    from shared.events import EventPublisher, UsageEvent

    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    nats_server = start_nats(tmp_path, streams=True)
    auditor = ServiceProcess(
        "auditor",
        env={"NATS_URL": nats_server.url, "PROMETHEUS_MULTIPROC_DIR": str(prom_dir)},
        log_path=tmp_path / "auditor.log",
    )
    try:
        auditor.start(timeout=40)
        nc = await nats.connect(nats_server.url)
        publisher = EventPublisher(nc.jetstream())
        publisher.start()
        for _ in range(5):
            publisher.emit(UsageEvent(service="proxy", type="proxy.request", status=200))
        assert await publisher.flush(10)
        await publisher.close()
        await nc.close()
        async with httpx.AsyncClient() as client:
            for _ in range(200):
                text = (await client.get(f"{auditor.url}/metrics")).text
                if 'keyveil_auditor_events_processed_total{stream="KEYVEIL_USAGE"} 5.0' in text:
                    break
                await asyncio.sleep(0.05)
        assert 'keyveil_auditor_events_processed_total{stream="KEYVEIL_USAGE"} 5.0' in text
        assert any(p.suffix == ".db" for p in prom_dir.iterdir())
        assert check_exposition("auditor", text) == []
    finally:
        auditor.stop()
        nats_server.stop()
