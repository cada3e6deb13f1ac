"""Webhook delivery against a tiny local HTTP server: retries with backoff, formats."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from services.auditor.alerts import AlertSink, WebhookSender
from services.auditor.detectors import Finding


class Receiver:
    """Answers the queued statuses in order (then 200) and records every body."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.statuses: list[int] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.bodies.append(json.loads(body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/T000/B000/secret"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    recv = Receiver()
    thread = threading.Thread(target=recv.server.serve_forever, daemon=True)
    thread.start()
    yield recv
    recv.server.shutdown()
    recv.server.server_close()


FINDING = Finding(
    "auth_failure_burst",
    "warning",
    "203.0.113.7",
    "25 failed authentications from 203.0.113.7 within 60s",
    1_700_000_000.0,
    {"client_ip": "203.0.113.7", "reason": "signature"},
)


async def test_slack_delivery_retries_5xx_then_succeeds(receiver: Receiver) -> None:
    receiver.statuses = [503, 502]
    sender = WebhookSender(receiver.url, fmt="slack", attempts=4, backoff_s=0.01)
    sink = AlertSink(None, sender)
    sender.start()
    alert = sink.raise_alert(FINDING)
    await sender.close(timeout=10)
    assert len(receiver.bodies) == 3
    assert receiver.bodies[0] == receiver.bodies[2]
    body = receiver.bodies[-1]
    assert "auth_failure_burst" in body["text"]
    assert alert.summary in body["blocks"][0]["text"]["text"]


async def test_alertmanager_format_and_giving_up(receiver: Receiver) -> None:
    receiver.statuses = [500, 500, 500]
    sender = WebhookSender(receiver.url, fmt="alertmanager", attempts=3, backoff_s=0.01)
    sink = AlertSink(None, sender)
    alert = sink.raise_alert(FINDING)
    assert await sender.deliver(alert) is False
    assert len(receiver.bodies) == 3
    (entry,) = receiver.bodies[0]
    assert entry["labels"]["alertname"] == "keyveil_auth_failure_burst"
    assert entry["labels"]["severity"] == "warning"
    assert entry["labels"]["client_ip"] == "203.0.113.7"
    assert entry["annotations"]["summary"] == alert.summary
    assert entry["startsAt"].endswith("Z")
    await sender.close()


async def test_a_refused_body_is_not_retried(receiver: Receiver) -> None:
    receiver.statuses = [400]
    sender = WebhookSender(receiver.url, attempts=5, backoff_s=0.01)
    assert await sender.deliver(AlertSink(None).raise_alert(FINDING)) is False
    assert len(receiver.bodies) == 1
    await sender.close()


async def test_unreachable_receiver_is_retried_then_given_up() -> None:
    sender = WebhookSender("http://127.0.0.1:9/nothing", attempts=3, backoff_s=0.01)
    assert await sender.deliver(AlertSink(None).raise_alert(FINDING)) is False
    await sender.close()


async def test_severity_below_minimum_is_not_posted(receiver: Receiver) -> None:
    sender = WebhookSender(receiver.url, backoff_s=0.01)
    sink = AlertSink(None, sender, webhook_min_severity="critical")
    sender.start()
    sink.raise_alert(FINDING)  # warning
    sink.raise_alert(Finding("replay_attempts", "critical", "t", "3 replays", 1.0))
    await sender.close(timeout=10)
    assert len(receiver.bodies) == 1
    assert "replay_attempts" in receiver.bodies[0]["text"]
