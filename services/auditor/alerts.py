"""Where findings go: an `AlertEvent` on the bus, a counter, a log line, and the webhook.

Webhook delivery runs in its own task behind a bounded queue, so a slow or dead
receiver never holds up event processing; each alert is retried with exponential
backoff (honouring Retry-After) and then given up on, counted either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import Any

import httpx
from prometheus_client import Counter

from services.auditor.detectors import Finding
from shared.events import AlertEvent, EventPublisher

__all__ = ["AlertSink", "WebhookSender", "alertmanager_payload", "slack_payload"]

log = logging.getLogger(__name__)

ALERTS = Counter("keyveil_auditor_alerts_total", "Alerts raised", ["type", "severity"])
WEBHOOK = Counter(
    "keyveil_auditor_webhook_deliveries_total",
    "Webhook delivery outcomes (retried counts each retry)",
    ["result"],
)
_SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def slack_payload(alert: AlertEvent) -> dict[str, Any]:
    """Slack incoming-webhook body (also accepted by Mattermost and most chat bridges)."""
    icon = {"info": ":information_source:", "warning": ":warning:", "critical": ":rotating_light:"}
    fields = " ".join(f"`{k}={v}`" for k, v in sorted(alert.labels.items()))
    return {
        "text": f"{icon[alert.severity]} keyveil {alert.severity}: {alert.type} - {alert.summary}",
        "blocks": [
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": f"*{alert.type}* ({alert.severity})\n{alert.summary}\n{fields}",
                },
            }
        ],
    }


def alertmanager_payload(alert: AlertEvent) -> list[dict[str, Any]]:
    """Alertmanager `POST /api/v2/alerts` body: a list of alerts with labels and annotations."""
    labels = {k: v for k, v in alert.labels.items() if v}
    labels.update(alertname=f"keyveil_{alert.type}", severity=alert.severity, source="keyveil")
    return [
        {
            "labels": labels,
            "annotations": {"summary": alert.summary, "event_id": alert.event_id},
            "startsAt": _iso(alert.ts),
        }
    ]


class WebhookSender:
    """Posts alerts to one URL with retries; the URL is a secret (Slack's carries a token)."""

    def __init__(
        self,
        url: str,
        *,
        fmt: str = "slack",
        attempts: int = 5,
        backoff_s: float = 0.5,
        queue_size: int = 1000,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._url = url
        self._fmt = fmt
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._queue: asyncio.Queue[AlertEvent] = asyncio.Queue(queue_size)
        self._client = httpx.AsyncClient(timeout=5.0, transport=transport)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="alert-webhook")

    def submit(self, alert: AlertEvent) -> None:
        try:
            self._queue.put_nowait(alert)
        except asyncio.QueueFull:
            WEBHOOK.labels("dropped").inc()
            log.warning("webhook queue full; alert %s not delivered", alert.event_id)

    async def close(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout)
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.aclose()

    async def _run(self) -> None:
        while True:
            alert = await self._queue.get()
            try:
                await self.deliver(alert)
            finally:
                self._queue.task_done()

    async def deliver(self, alert: AlertEvent) -> bool:
        """POST one alert, retrying transport errors, 429 and 5xx; True once accepted."""
        body = slack_payload(alert) if self._fmt == "slack" else alertmanager_payload(alert)
        delay = self._backoff_s
        for attempt in range(1, self._attempts + 1):
            retry_after: float | None = None
            try:
                answer = await self._client.post(self._url, json=body)
            except httpx.HTTPError as exc:
                problem = type(exc).__name__
            else:
                if answer.status_code < 300:
                    WEBHOOK.labels("ok").inc()
                    return True
                problem = f"status {answer.status_code}"
                if answer.status_code != 429 and answer.status_code < 500:
                    break  # the receiver refuses this body; retrying will not change that
                header = answer.headers.get("retry-after", "")
                if header.isdigit():
                    retry_after = min(float(header), 60.0)
            if attempt < self._attempts:
                WEBHOOK.labels("retried").inc()
                log.warning("alert webhook attempt %d failed (%s); retrying", attempt, problem)
                await asyncio.sleep(retry_after if retry_after is not None else delay)
                delay = min(delay * 2, 30.0)
        WEBHOOK.labels("failed").inc()
        log.error("alert webhook gave up on alert %s (%s)", alert.event_id, problem)
        return False


class AlertSink:
    """Turns findings into alerts: bus event, metric, log line and (optionally) webhook."""

    def __init__(
        self,
        publisher: EventPublisher | None,
        webhook: WebhookSender | None = None,
        *,
        webhook_min_severity: str = "warning",
    ) -> None:
        self._publisher = publisher
        self._webhook = webhook
        self._min_rank = _SEVERITY_RANK[webhook_min_severity]
        self.raised: list[AlertEvent] = []  # the most recent few, for tests and debugging

    def raise_alert(self, finding: Finding) -> AlertEvent:
        alert = AlertEvent(
            service="auditor",
            type=finding.type,
            severity=finding.severity,
            summary=finding.summary,
            labels={**finding.labels, "observed_at": _iso(finding.ts)},
        )
        ALERTS.labels(alert.type, alert.severity).inc()
        log.warning(
            "alert %s (%s): %s",
            alert.type,
            alert.severity,
            alert.summary,
            extra={"fields": {"alert_type": alert.type, "alert_id": alert.event_id}},
        )
        if self._publisher is not None:
            self._publisher.emit(alert)
        if self._webhook is not None and _SEVERITY_RANK[alert.severity] >= self._min_rank:
            self._webhook.submit(alert)
        self.raised.append(alert)
        del self.raised[:-100]
        return alert
