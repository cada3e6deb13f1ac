"""RefusalSampler: a flood of unauthenticated refusals costs few events, and none goes uncounted."""

from __future__ import annotations

import asyncio

from shared.contract import Refusal
from shared.events import UsageEvent
from shared.eventschema import Refused
from shared.refusals import RefusalSampler


def _refusal(reason: str = "token_invalid", ip: str | None = "203.0.113.7") -> UsageEvent:
    return UsageEvent(
        service="proxy",
        type="proxy.request",
        outcome="denied",
        reason=Refused.of(Refusal[reason.upper()]),
        client_ip=ip,
    )


async def test_a_flood_is_one_event_now_and_one_sum_per_interval() -> None:
    sent: list[UsageEvent] = []
    sampler = RefusalSampler(sent.append, interval_s=0.2)
    for _ in range(500):
        sampler.refused(_refusal())
    assert [e.count for e in sent] == [1]  # the first at once
    await asyncio.sleep(0.3)
    assert [e.count for e in sent] == [1, 499]  # the rest as one sum
    await asyncio.sleep(0.3)
    assert len(sent) == 2  # quiet: nothing more
    sampler.refused(_refusal())
    assert [e.count for e in sent] == [1, 499, 1]  # after a quiet interval: at once again
    sampler.close()


async def test_reasons_and_clients_are_kept_apart() -> None:
    sent: list[UsageEvent] = []
    sampler = RefusalSampler(sent.append, interval_s=0.1)
    for ip in ("198.51.100.1", "198.51.100.2"):
        for reason in ("token_invalid", "bad_request"):
            for _ in range(3):
                sampler.refused(_refusal(reason, ip))
    await asyncio.sleep(0.15)
    sampler.close()
    totals: dict[tuple[str | None, str | None], int] = {}
    for event in sent:
        key = (getattr(event.reason, "code", None), event.client_ip)
        totals[key] = totals.get(key, 0) + (event.count or 0)
    assert totals == {
        (reason, ip): 3
        for ip in ("198.51.100.1", "198.51.100.2")
        for reason in ("token_invalid", "bad_request")
    }
    assert len(sent) == 8


async def test_many_clients_share_one_key_per_reason_past_the_cap() -> None:
    sent: list[UsageEvent] = []
    sampler = RefusalSampler(sent.append, interval_s=0.1, max_keys=4)
    for i in range(1000):
        sampler.refused(_refusal(ip=f"2001:db8::{i:x}"))
    await asyncio.sleep(0.15)
    sampler.close()
    assert sum(e.count or 0 for e in sent) == 1000
    assert len(sent) <= 6  # 4 clients + the shared key, and its sum
    assert any(e.client_ip is None for e in sent)


async def test_close_sends_what_is_pending() -> None:
    sent: list[UsageEvent] = []
    sampler = RefusalSampler(sent.append, interval_s=60)
    for _ in range(7):
        sampler.refused(_refusal())
    sampler.close()
    assert sum(e.count or 0 for e in sent) == 7
