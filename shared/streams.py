"""Every JetStream stream and bucket keyveil uses: one definition, created at deploy time.

Runtime services never create, update or delete a stream: a service login that could
(the red-team review showed it) can erase the audit trail with `max_msgs=1` or a new
subject filter, whatever `deny_purge` says. The streams are made by `keyveil bootstrap`,
run by the operator with the `bootstrap` NATS login that no service holds (a Job at
deploy time in Kubernetes). Each service then checks at start and periodically that the
streams it uses are exactly as defined here (`check_streams`): drift makes it not ready,
and it says so (log, metric, audit event).

Storage quotas (`max_bytes`) keep one stream from starving another: usage events cannot
fill the disk the keys and the audit trail live on. A full usage or alerts stream drops
its oldest messages; a full audit stream or ledger refuses new ones (publishers keep them
buffered and retry), so audit history is never discarded silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from prometheus_client import Gauge

__all__ = [
    "ALERTS_STREAM",
    "AUDITOR_STREAMS",
    "AUDIT_STREAM",
    "EDGE_STREAMS",
    "KEYS_BUCKET",
    "LEDGER_STREAM",
    "LEDGER_SUBJECT",
    "STREAMS",
    "USAGE_STREAM",
    "Drift",
    "StreamGuard",
    "bootstrap_streams",
    "check_streams",
    "expected_stream",
    "keys_bucket_config",
]

log = logging.getLogger(__name__)

MIB = 1024 * 1024
GIB = 1024 * MIB
LEDGER_SUBJECT = "keyveil.ledger.audit"
KEYS_BUCKET = "KEYVEIL_KEYS"

STREAM_CONFIG_OK = Gauge(
    "keyveil_stream_config_ok",
    "1 when a stream this service uses exists exactly as defined, 0 when missing or drifted",
    ["stream"],
)


def _stream(
    name: str,
    subject: str,
    *,
    max_age_days: int | None,
    max_bytes: int,
    append_only: bool,
    duplicate_window_s: float = 120.0,
) -> StreamConfig:
    return StreamConfig(
        name=name,
        subjects=[subject],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=timedelta(days=max_age_days).total_seconds() if max_age_days else 0.0,
        max_bytes=max_bytes,
        max_msgs=-1,
        max_msgs_per_subject=-1,
        # Append-only streams refuse when full instead of dropping their start.
        discard=DiscardPolicy.NEW if append_only else DiscardPolicy.OLD,
        duplicate_window=duplicate_window_s,
        deny_delete=append_only,
        deny_purge=append_only,
        allow_rollup_hdrs=False,
    )


USAGE_STREAM = _stream(
    "KEYVEIL_USAGE", "keyveil.usage.>", max_age_days=14, max_bytes=2 * GIB, append_only=False
)
AUDIT_STREAM = _stream(
    "KEYVEIL_AUDIT", "keyveil.audit.>", max_age_days=400, max_bytes=2 * GIB, append_only=True
)
ALERTS_STREAM = _stream(
    "KEYVEIL_ALERTS", "keyveil.alerts.>", max_age_days=90, max_bytes=256 * MIB, append_only=False
)
LEDGER_STREAM = _stream(
    "KEYVEIL_AUDIT_LEDGER",
    LEDGER_SUBJECT,
    max_age_days=None,  # the chain is kept whole; its quota refuses rather than forgets
    max_bytes=4 * GIB,
    append_only=True,
    duplicate_window_s=timedelta(days=1).total_seconds(),
)
STREAMS: tuple[StreamConfig, ...] = (USAGE_STREAM, AUDIT_STREAM, ALERTS_STREAM, LEDGER_STREAM)
# The streams each kind of service publishes to or reads, for its start-up check.
EDGE_STREAMS = ("KEYVEIL_USAGE", "KEYVEIL_AUDIT")
AUDITOR_STREAMS = ("KEYVEIL_USAGE", "KEYVEIL_AUDIT", "KEYVEIL_ALERTS", "KEYVEIL_AUDIT_LEDGER")
_BY_NAME = {stream.name: stream for stream in STREAMS}

# What must match for a stream to be "as defined": everything that decides what is kept.
_CHECKED_FIELDS = (
    "subjects",
    "retention",
    "storage",
    "max_age",
    "max_bytes",
    "max_msgs",
    "max_msgs_per_subject",
    "discard",
    "duplicate_window",
    "deny_delete",
    "deny_purge",
    "allow_rollup_hdrs",
    "num_replicas",
)


def expected_stream(name: str, *, replicas: int = 1) -> StreamConfig:
    """The definition of stream `name` at `replicas` replicas."""
    return replace(_BY_NAME[name], num_replicas=replicas)


def keys_bucket_config(
    *, bucket: str = KEYS_BUCKET, replicas: int = 1, history: int = 10
) -> KeyValueConfig:
    """The key-manager's KV bucket (only the key-manager may read or write it)."""
    return KeyValueConfig(
        bucket=bucket,
        description="keyveil provider keys (envelope-encrypted, one entry per version)",
        history=history,
        storage=StorageType.FILE,
        replicas=replicas,
        max_bytes=64 * MIB,
    )


@dataclass(frozen=True)
class Drift:
    """A stream that is missing, or whose configuration differs in `fields`."""

    stream: str
    fields: tuple[str, ...]

    @property
    def missing(self) -> bool:
        return self.fields == ("missing",)

    def describe(self) -> str:
        if self.missing:
            return f"{self.stream} does not exist (run `keyveil bootstrap`)"
        return f"{self.stream} differs from its definition in {', '.join(self.fields)}"


def _normalised(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if value is None:
        return None
    return value


def _differences(actual: StreamConfig, expected: StreamConfig) -> tuple[str, ...]:
    defaults = StreamConfig()
    out = []
    for name in _CHECKED_FIELDS:
        want = getattr(expected, name)
        got = getattr(actual, name)
        # The server reports unset limits as -1/0/False; compare like with like.
        if got is None:
            got = getattr(defaults, name)
        if name in ("max_msgs", "max_msgs_per_subject", "max_bytes") and got in (None, 0):
            got = -1
        if name in ("deny_delete", "deny_purge", "allow_rollup_hdrs"):
            got, want = bool(got), bool(want)
        if name == "num_replicas":
            got, want = got or 1, want or 1
        if _normalised(got) != _normalised(want):
            out.append(name)
    return tuple(out)


async def check_streams(
    js: JetStreamContext, names: Iterable[str], *, replicas: int = 1
) -> list[Drift]:
    """Every stream of `names` that is missing or differs from its definition."""
    drifts: list[Drift] = []
    for name in names:
        expected = expected_stream(name, replicas=replicas)
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            drifts.append(Drift(name, ("missing",)))
            STREAM_CONFIG_OK.labels(name).set(0)
            continue
        fields = _differences(info.config, expected)
        STREAM_CONFIG_OK.labels(name).set(0 if fields else 1)
        if fields:
            drifts.append(Drift(name, fields))
    return drifts


async def bootstrap_streams(
    js: JetStreamContext,
    *,
    replicas: int = 1,
    names: Sequence[str] | None = None,
    keys_bucket: str | None = KEYS_BUCKET,
) -> list[str]:
    """Create (or converge) every stream, and the keys bucket; what was done, one line each.

    Converging an existing stream only ever applies this module's definition, so running
    bootstrap again repairs a drifted stream (as far as JetStream allows: a stream whose
    messages were already erased stays erased, which the ledger's checkpoints reveal).
    """
    done: list[str] = []
    for name in names or [s.name or "" for s in STREAMS]:
        config = expected_stream(name, replicas=replicas)
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            await js.add_stream(config)
            done.append(f"created stream {name}")
            continue
        fields = _differences(info.config, config)
        if fields:
            await js.update_stream(config)
            done.append(f"updated stream {name} ({', '.join(fields)})")
        else:
            done.append(f"stream {name} is as defined")
    if keys_bucket:
        try:
            await js.key_value(keys_bucket)
            done.append(f"bucket {keys_bucket} exists")
        except nats.js.errors.BucketNotFoundError:
            await js.create_key_value(keys_bucket_config(bucket=keys_bucket, replicas=replicas))
            done.append(f"created bucket {keys_bucket}")
    return done


class StreamGuard:
    """Re-checks a service's streams in the background; `ok` feeds its readiness.

    A drift is reported once when it appears (log line + `on_drift`, which services use
    to publish an audit event the auditor alerts on) and again after it clears and
    reappears, not on every round.
    """

    def __init__(
        self,
        js: JetStreamContext,
        names: Sequence[str],
        *,
        replicas: int = 1,
        interval_s: float = 30.0,
        on_drift: Callable[[list[Drift]], None] | None = None,
    ) -> None:
        self._js = js
        self._names = tuple(names)
        self._replicas = replicas
        self._interval_s = interval_s
        self._on_drift = on_drift
        self._reported: frozenset[Drift] = frozenset()
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.ok = False

    async def check(self) -> bool:
        try:
            drifts = await check_streams(self._js, self._names, replicas=self._replicas)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            log.warning("stream check failed (%s)", type(exc).__name__)
            self.ok = False
            return False
        new = frozenset(drifts) - self._reported
        if new:
            for drift in sorted(new, key=lambda d: d.stream):
                log.error("stream configuration: %s", drift.describe())
            if self._on_drift is not None:
                self._on_drift(sorted(new, key=lambda d: d.stream))
        self._reported = frozenset(drifts)
        self.ok = not drifts
        return self.ok

    async def ready(self) -> bool:
        """Readiness probe: the last round's answer, re-checked now while not ok."""
        return self.ok or await self.check()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="stream-guard")

    async def stop(self) -> None:
        """Stop by signal, not by cancel alone: a cancellation that lands as a NATS reply
        completes is swallowed by `wait_for` (Python 3.11), and the round's sleep would
        then hold the shutdown for a whole interval."""
        self._stopping.set()
        if self._task is None:
            return
        _, pending = await asyncio.wait({self._task}, timeout=5.0)
        for task in pending:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await self.check()
            pause = self._interval_s if self.ok else min(self._interval_s, 2.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), pause)
