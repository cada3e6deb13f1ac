"""The auditor process: two durable consumers, the ledger, alerts, and the edge routes.

The ledger is signed with LEDGER_SIGNING_KEY and, with LEDGER_CHECKPOINT_DIR, its head
is checkpointed by a background task (services/auditor/checkpoints.py).
HTTP serves only /healthz, /readyz and /metrics; the work happens in the consumer tasks.
Replicas: the ledger is safe with any number of writers (expected-last-sequence), and
ids are de-duplicated per replica. Detector windows, however, live in memory, so
several replicas sharing one durable consumer would each see part of the traffic and
count less; run one replica (the Deployment uses `replicas: 1` and `Recreate`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import replace

from fastapi import FastAPI
from nats.js.api import StreamConfig

from services.auditor.alerts import AlertSink, WebhookSender
from services.auditor.auditor import Auditor
from services.auditor.checkpoints import (
    Checkpointer,
    CheckpointStore,
    ephemeral_verifier,
    record_ephemeral_key,
)
from services.auditor.consumers import DurableConsumer, E, Handler
from services.auditor.detectors import Detectors, Finding
from services.auditor.ledger import LEDGER_STREAM, BrokenLink, Ledger
from services.auditor.ledgerkeys import LedgerSigner
from services.auditor.settings import Settings
from shared.events import AUDIT_STREAM, USAGE_STREAM, AuditEvent, EventPublisher, UsageEvent
from shared.runtime import ServiceRuntime, started
from shared.streams import AUDITOR_STREAMS

__all__ = [
    "AUDIT_DURABLE",
    "USAGE_DURABLE",
    "AuditorRuntime",
    "create_app",
    "start_runtime",
    "stop_runtime",
]

log = logging.getLogger(__name__)

USAGE_DURABLE = "auditor-usage"
AUDIT_DURABLE = "auditor-audit"


class AuditorRuntime:
    """The auditor's parts on a `ServiceRuntime`; `consumers` and `auditor` for tests."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime = ServiceRuntime(settings, service="auditor", streams=AUDITOR_STREAMS)
        self.runtime.ready_when("consumers", self.consumers_ready)
        self.consumers: list[DurableConsumer[UsageEvent] | DurableConsumer[AuditEvent]] = []
        self._auditor: Auditor | None = None

    @property
    def auditor(self) -> Auditor:
        return started(self._auditor)

    @property
    def publisher(self) -> EventPublisher:
        return self.runtime.publisher

    async def consumers_ready(self) -> bool:
        return bool(self.consumers) and all(c.bound for c in self.consumers)

    async def build(self) -> None:
        """The auditor's part of the start: alerts, ledger, and the two consumer tasks."""
        settings = self.settings
        runtime = self.runtime
        js = runtime.js
        webhook = None
        if settings.alert_webhook_url is not None:
            webhook = WebhookSender(
                settings.alert_webhook_url.get_secret_value(),
                fmt=settings.alert_webhook_format,
                attempts=settings.alert_webhook_attempts,
                backoff_s=settings.alert_webhook_backoff_s,
            )
            webhook.start()
            runtime.stack.push_async_callback(webhook.close)
        sink = AlertSink(
            runtime.publisher, webhook, webhook_min_severity=settings.alert_webhook_min_severity
        )
        ledger = None
        checkpointer = None
        if settings.ledger_enabled:
            signer = ledger_signer(settings)
            verifier = settings.ledger_verifier()
            if not settings.is_production and settings.ledger_checkpoint_dir is not None:
                # Records signed by earlier development processes' generated keys.
                verifier = verifier.merged(ephemeral_verifier(settings.ledger_checkpoint_dir))
            ledger = Ledger(
                js,
                instance=f"{socket.gethostname()}:{os.getpid()}",
                signer=signer,
                verifier=verifier,
                stream=replace(LEDGER_STREAM, num_replicas=settings.jetstream_replicas),
            )
            if settings.ledger_checkpoint_dir is not None:
                checkpointer = Checkpointer(
                    js,
                    stream=ledger.stream_name,
                    signer=signer,
                    verifier=ledger.verifier,
                    store=CheckpointStore(
                        settings.ledger_checkpoint_dir, keep=settings.ledger_checkpoint_keep
                    ),
                    interval_s=settings.ledger_checkpoint_interval_s,
                    on_problem=lambda problems: _alert_ledger(sink, problems),
                )
        self._auditor = auditor = Auditor(Detectors(settings), sink, ledger)
        self.consumers = [
            self._consumer(USAGE_STREAM, USAGE_DURABLE, UsageEvent, auditor.on_usage),
            self._consumer(AUDIT_STREAM, AUDIT_DURABLE, AuditEvent, auditor.on_audit),
        ]
        for consumer in self.consumers:
            runtime.spawn(consumer.run(runtime.stopping), name=f"consume-{consumer.durable}")
        if checkpointer is not None:
            runtime.spawn(checkpointer.run(runtime.stopping), name="ledger-checkpoints")

    def _consumer(
        self, stream: StreamConfig, durable: str, model: type[E], handler: Handler[E]
    ) -> DurableConsumer[E]:
        settings = self.settings
        return DurableConsumer(
            self.runtime.js,
            stream=replace(stream, num_replicas=settings.jetstream_replicas),
            durable=durable,
            model=model,
            handler=handler,
            ack_wait_s=settings.ack_wait_s,
            max_deliver=settings.max_deliver,
            batch=settings.fetch_batch,
            seen_capacity=settings.dedupe_window,
        )


async def start_runtime(settings: Settings) -> AuditorRuntime:
    """An auditor started in-process (tests, benchmarks); `stop_runtime` drains it."""
    auditor = AuditorRuntime(settings)
    await auditor.runtime.start(auditor.build)
    return auditor


async def stop_runtime(auditor: AuditorRuntime) -> None:
    await auditor.runtime.stop()


def ledger_signer(settings: Settings) -> LedgerSigner:
    """The configured key; outside production (where the settings require one) a missing
    one is generated for this process.

    An ephemeral key's public half is logged (it is not secret) and written next to the
    checkpoints, so `keyveil audit verify --verify-key ...` can still check the records.
    """
    signer = settings.ledger_signer()
    if signer is not None:
        return signer
    signer = LedgerSigner.generate()
    log.warning(
        "LEDGER_SIGNING_KEY is not set: signing the ledger with an ephemeral key %s "
        "(verify with --verify-key %s)",
        signer.key_id,
        signer.public_key_b64,
    )
    if settings.ledger_checkpoint_dir is not None:
        record_ephemeral_key(settings.ledger_checkpoint_dir, signer)
    return signer


def _alert_ledger(sink: AlertSink, problems: list[BrokenLink]) -> None:
    first = problems[0]
    kind = "ledger_foreign_record" if first.code == "foreign" else "ledger_integrity"
    sink.raise_alert(
        Finding(
            type=kind,
            severity="critical",
            subject=f"seq-{first.seq}",
            summary=f"audit ledger seq {first.seq}: {first.reason}"
            + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""),
            ts=time.time(),
            labels={"code": first.code, "seq": str(first.seq)},
        )
    )


def create_app(settings: Settings) -> FastAPI:
    auditor = AuditorRuntime(settings)
    app = auditor.runtime.app("keyveil auditor", auditor.build)
    app.state.runtime = auditor
    return app
