"""Fault injection: kill -9 each service, NATS and Redis under steady signed traffic.

For every victim: nothing the clients were answered goes missing from the usage
stream, the auditor processes all of it, no request reaches the provider while Redis
(nonces, limits, revocations) is down, and the system serves again within
RECOVERY_BOUND_S without anyone restarting anything by hand.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis

from tests.stack import Stack, Traffic, fake_calls, proxy_usage, running_stack

pytestmark = pytest.mark.slow

RECOVERY_BOUND_S = 20.0


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"VOICE_AGENT_PROXY_RATE_LIMIT": "100000", "VOICE_AGENT_RATE_LIMIT": "10000"}
    with running_stack(tmp_path_factory.mktemp("faults"), env=env) as stack:
        yield stack


@dataclass
class RedisWatch:
    """Intervals during which Redis refused connections (the process was gone).

    Only a refused or dropped connection counts as down: a PING that merely times out on
    a loaded machine says nothing, and must not be mistaken for an outage.
    """

    url: str
    down: list[tuple[float, float]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=0.2, socket_connect_timeout=0.2)
        first_refused: float | None = None
        last_refused = 0.0
        while not self.stop.is_set():
            try:
                client.ping()
                if first_refused is not None:
                    # From the first refusal to the last one Redis was certainly gone; a
                    # request that started and ended inside ran with no nonce check possible.
                    self.down.append((first_refused, last_refused))
                    first_refused = None
            except redis.TimeoutError:
                pass
            except redis.ConnectionError:
                last_refused = time.monotonic()
                first_refused = first_refused or last_refused
            time.sleep(0.01)
        client.close()


@pytest.mark.parametrize("victim", ["redis", "nats", "keymanager", "auditor", "token", "proxy"])
async def test_kill_9_under_traffic(fault_stack: Stack, victim: str) -> None:
    stack = fault_stack
    calls_before = len(fake_calls(stack))
    events_before, _, _ = await proxy_usage(stack)
    traffic = Traffic(stack)
    watch = RedisWatch(stack.info["redis_url"])
    threads = [threading.Thread(target=traffic.run), threading.Thread(target=watch.run)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 20
        while traffic.ok() < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert traffic.ok() >= 10, f"no steady traffic before the fault: {traffic.answers[-5:]}"

        killed_at = time.monotonic()
        os.kill(stack.pid(victim), signal.SIGKILL)
        time.sleep(0.5)
        recovered_at: float | None = None
        while time.monotonic() - killed_at < RECOVERY_BOUND_S + 10:
            recent = [a for a in traffic.answers if a[0] > killed_at + 0.5]
            if len(recent) >= 5 and all(status == 200 for *_, status in recent[-5:]):
                recovered_at = recent[-5][0]
                break
            time.sleep(0.1)
        assert recovered_at is not None, f"{victim}: never served again: {traffic.answers[-5:]}"
        recovery_s = recovered_at - killed_at
        assert recovery_s < RECOVERY_BOUND_S, f"{victim}: recovered after {recovery_s:.1f}s"
        time.sleep(0.5)
    finally:
        traffic.stop.set()
        watch.stop.set()
        for thread in threads:
            thread.join(15)

    # Fail closed: no request was answered 200 while Redis could not check its nonce.
    inside = [
        status
        for down_from, down_to in watch.down
        for started, ended, status in traffic.answers
        if started > down_from and ended < down_to
    ]
    assert 200 not in inside, f"{victim}: 200 while Redis down"
    if victim == "redis":
        assert inside, "no request fell inside the Redis outage: the check proved nothing"
    failures = {status for *_, status in traffic.answers if status != 200}
    assert failures <= {0, 502, 503, 504}, f"{victim}: unexpected statuses {failures}"

    # Every request the provider saw was answered to the client (proxy death: one in flight).
    forwarded = len(fake_calls(stack)) - calls_before
    slack = 1 if victim == "proxy" else 0
    assert traffic.ok() <= forwarded <= traffic.ok() + slack

    # Nothing lost: each 200 has its usage event, and the auditor processed the stream.
    deadline = time.monotonic() + 45
    while True:
        events, last, floor = await proxy_usage(stack)
        new_ok = [e for e in events[len(events_before) :] if e.status == 200]
        if (len(new_ok) >= traffic.ok() and floor >= last) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len({e.event_id for e in new_ok}) >= traffic.ok(), f"{victim}: usage events lost"
    assert floor >= last, f"{victim}: auditor stuck at {floor} of {last}"

    # No manual restart needed: every process is up and ready.
    for name in ("token", "proxy", "keymanager", "auditor"):
        stack.wait_ready(name, timeout=RECOVERY_BOUND_S)
