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

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

from fastapi import FastAPI
from nats.aio.client import Client as NATS

from services.auditor.alerts import AlertSink, WebhookSender
from services.auditor.auditor import Auditor
from services.auditor.checkpoints import (
    Checkpointer,
    CheckpointStore,
    ephemeral_verifier,
    record_ephemeral_key,
)
from services.auditor.consumers import DurableConsumer
from services.auditor.detectors import Detectors, Finding
from services.auditor.ledger import LEDGER_STREAM, BrokenLink, Ledger
from services.auditor.ledgerkeys import LedgerSigner
from services.auditor.settings import Settings
from shared import bus
from shared.events import (
    AUDIT_STREAM,
    USAGE_STREAM,
    AuditEvent,
    EventPublisher,
    UsageEvent,
    drift_reporter,
)
from shared.httpedge import add_edge_routes, service_app
from shared.streams import AUDITOR_STREAMS, StreamGuard
from shared.telemetry import redactor

__all__ = ["AUDIT_DURABLE", "USAGE_DURABLE", "AuditorRuntime", "create_app"]

log = logging.getLogger(__name__)

USAGE_DURABLE = "auditor-usage"
AUDIT_DURABLE = "auditor-audit"


@dataclass
class AuditorRuntime:
    """What the lifespan started; kept on `app.state.runtime` for readiness and tests."""

    nc: NATS
    auditor: Auditor
    consumers: list[DurableConsumer[UsageEvent] | DurableConsumer[AuditEvent]]
    publisher: EventPublisher
    webhook: WebhookSender | None
    streams: StreamGuard
    checkpointer: Checkpointer | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


async def start_runtime(settings: Settings) -> AuditorRuntime:
    nc = await bus.connect(settings, name="auditor")
    js = nc.jetstream()
    publisher = EventPublisher(js)
    publisher.start()
    streams = StreamGuard(
        js,
        AUDITOR_STREAMS,
        replicas=settings.jetstream_replicas,
        on_drift=drift_reporter(publisher, "auditor"),
    )
    streams.start()
    webhook = None
    if settings.alert_webhook_url is not None:
        webhook = WebhookSender(
            settings.alert_webhook_url.get_secret_value(),
            fmt=settings.alert_webhook_format,
            attempts=settings.alert_webhook_attempts,
            backoff_s=settings.alert_webhook_backoff_s,
        )
        webhook.start()
    sink = AlertSink(publisher, webhook, webhook_min_severity=settings.alert_webhook_min_severity)
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
    auditor = Auditor(Detectors(settings), sink, ledger)
    common = {
        "ack_wait_s": settings.ack_wait_s,
        "max_deliver": settings.max_deliver,
        "batch": settings.fetch_batch,
        "seen_capacity": settings.dedupe_window,
    }
    usage: DurableConsumer[UsageEvent] = DurableConsumer(
        js,
        stream=replace(USAGE_STREAM, num_replicas=settings.jetstream_replicas),
        durable=USAGE_DURABLE,
        model=UsageEvent,
        handler=auditor.on_usage,
        **common,  # type: ignore[arg-type]
    )
    audit: DurableConsumer[AuditEvent] = DurableConsumer(
        js,
        stream=replace(AUDIT_STREAM, num_replicas=settings.jetstream_replicas),
        durable=AUDIT_DURABLE,
        model=AuditEvent,
        handler=auditor.on_audit,
        **common,  # type: ignore[arg-type]
    )
    runtime = AuditorRuntime(nc, auditor, [usage, audit], publisher, webhook, streams, checkpointer)
    for consumer in runtime.consumers:
        runtime.tasks.append(
            asyncio.create_task(consumer.run(runtime.stop), name=f"consume-{consumer.durable}")
        )
    if checkpointer is not None:
        runtime.tasks.append(
            asyncio.create_task(checkpointer.run(runtime.stop), name="ledger-checkpoints")
        )
    return runtime


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


async def stop_runtime(runtime: AuditorRuntime) -> None:
    runtime.stop.set()
    if runtime.tasks:
        done, pending = await asyncio.wait(runtime.tasks, timeout=10)
        for task in pending:
            log.warning("%s did not stop in time; cancelling", task.get_name())
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("%s ended with %r", task.get_name(), task.exception())
    await runtime.streams.stop()
    await runtime.publisher.close()
    if runtime.webhook is not None:
        await runtime.webhook.close()
    with contextlib.suppress(Exception):
        await runtime.nc.drain()


def create_app(settings: Settings) -> FastAPI:
    redactor.register(*settings.secret_values())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await start_runtime(settings)
        app.state.runtime = runtime
        try:
            yield
        finally:
            await stop_runtime(runtime)

    app = service_app("keyveil auditor", lifespan)

    async def nats_ready() -> bool:
        runtime: AuditorRuntime | None = getattr(app.state, "runtime", None)
        return runtime is not None and runtime.nc.is_connected

    async def consumers_ready() -> bool:
        runtime: AuditorRuntime | None = getattr(app.state, "runtime", None)
        return runtime is not None and all(c.bound for c in runtime.consumers)

    async def streams_ready() -> bool:
        runtime: AuditorRuntime | None = getattr(app.state, "runtime", None)
        return runtime is not None and await runtime.streams.ready()

    add_edge_routes(
        app, {"nats": nats_ready, "consumers": consumers_ready, "streams": streams_ready}
    )
    return app
