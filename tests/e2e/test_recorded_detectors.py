"""The auditor's detectors, fed with events the running services really published.

Hand-built events hide drift: a field every detector reads and no producer fills
(`key_id`, `country`) or a detail under another name (`age_s` vs `age_days`). Here a
real stack (`keyveil up`) serves signed calls through a "trusted ingress" that sets the
country header; the usage and audit events are read back from JetStream and replayed
into `Detectors` on a timeline (only `ts` changes: every other field is as produced).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from services.auditor.detectors import Detectors
from shared.events import AuditEvent, UsageEvent
from shared.eventschema import RotationDue
from tests.services.auditor.helpers import settings
from tests.stack import (
    CHAT_BODY,
    CHAT_PATH,
    Stack,
    issue_token,
    operator_nats,
    read_stream,
    running_stack,
    signed_headers,
)

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

COUNTRY_HEADER = "X-Client-Country"
T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    env = {
        "VOICE_AGENT_RATE_LIMIT": "600",
        "VOICE_AGENT_PROXY_RATE_LIMIT": "6000",
        "COUNTRY_HEADER": COUNTRY_HEADER,
        "TRUSTED_PROXIES": "127.0.0.0/8",  # the test client plays the ingress
        # every key is overdue within a second; checked every 2 s, reported once an hour
        "KEYMANAGER_MAX_KEY_AGE_DAYS": "0.00001",
        "KEYMANAGER_POLICY_INTERVAL_S": "2",
    }
    with running_stack(tmp_path_factory.mktemp("recorded"), env=env) as stack:
        yield _record(stack, tmp_path_factory.mktemp("events"))


def _record(stack: Stack, out: Path) -> Path:
    proxy = stack.url("proxy")
    token = issue_token(stack).json()
    with httpx.Client(timeout=10) as client:
        for country in ("DE", "DE", "DE", "FR", "ZZ"):
            headers = signed_headers(
                token,
                method="POST",
                path=CHAT_PATH,
                body=CHAT_BODY.encode(),
                authority=urlsplit(proxy).netloc,
            )
            headers[COUNTRY_HEADER] = country
            answer = client.post(f"{proxy}{CHAT_PATH}", content=CHAT_BODY, headers=headers)
            assert answer.status_code == 200, answer.text
    deadline = time.monotonic() + 20
    while True:
        usage, audit = asyncio.run(_read(stack))
        proxied = [e for e in usage if e.type == "proxy.request"]
        due = [e for e in audit if e.type == "rotation_due"]
        if (len(proxied) >= 5 and due) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    (out / "usage.jsonl").write_text("\n".join(e.model_dump_json() for e in proxied))
    (out / "audit.jsonl").write_text("\n".join(e.model_dump_json() for e in due))
    return out


async def _read(stack: Stack) -> tuple[list[UsageEvent], list[AuditEvent]]:
    nc = await operator_nats(stack)
    try:
        usage = [
            UsageEvent.model_validate_json(m) for m in await read_stream(nc, "keyveil.usage.proxy")
        ]
        audit = [
            AuditEvent.model_validate_json(m)
            for m in await read_stream(nc, "keyveil.audit.keymanager")
        ]
        return usage, audit
    finally:
        await nc.close()


def _usage(recorded: Path) -> list[UsageEvent]:
    text = (recorded / "usage.jsonl").read_text()
    return [UsageEvent.model_validate_json(line) for line in text.splitlines() if line]


def test_proxied_calls_carry_the_key_and_the_trusted_country(recorded: Path) -> None:
    events = _usage(recorded)
    assert len(events) == 5
    assert all(e.key_id for e in events), "the lease's key id is on every proxied call"
    assert [e.country for e in events] == ["DE", "DE", "DE", "FR", None]  # ZZ: unknown


def test_per_key_usage_spike_from_recorded_calls(recorded: Path) -> None:
    call = _usage(recorded)[0]
    assert call.key_id is not None
    detectors = Detectors(settings())
    # A steady minute-by-minute baseline of that very event, then a burst.
    steady = [
        call.model_copy(update={"ts": T0 + m * 60 + s * 5}) for m in range(20) for s in range(2)
    ]
    assert [f for e in steady for f in detectors.observe_usage(e)] == []
    burst_at = T0 + 25 * 60
    burst = [call.model_copy(update={"ts": burst_at + i * 0.5}) for i in range(80)]
    found = {f.type: f for e in burst for f in detectors.observe_usage(e)}
    assert "usage_spike_key" in found
    assert found["usage_spike_key"].labels["key_id"] == call.key_id


def test_geography_from_the_trusted_header(recorded: Path) -> None:
    events = _usage(recorded)
    german = next(e for e in events if e.country == "DE")
    french = next(e for e in events if e.country == "FR")
    detectors = Detectors(settings(geo_key_warmup_events=20))
    # The key learns Germany from many calls; then the same token shows up in France.
    learned = [german.model_copy(update={"ts": T0 + i}) for i in range(25)]
    assert [f for e in learned for f in detectors.observe_usage(e)] == []
    found = detectors.observe_usage(french.model_copy(update={"ts": T0 + 60}))
    by_type = {f.type: f for f in found}
    assert by_type["geo_token_countries"].labels["countries"] == "DE,FR"
    assert by_type["geo_new_country"].labels == {"key_id": french.key_id, "country": "FR"}


def test_rotation_due_summary_has_the_key_age(recorded: Path) -> None:
    lines = (recorded / "audit.jsonl").read_text().splitlines()
    assert lines, "the key-manager reported no overdue key"
    event = AuditEvent.model_validate_json(lines[0])
    assert isinstance(event.detail, RotationDue)
    assert event.detail.age_s >= 1
    [finding] = Detectors(settings()).observe_audit(event)
    assert finding.type == "rotation_overdue"
    assert "days old" in finding.summary
