"""One server sideband per brokered voice session: usage, policy, and ending it.

GPT-Live: `wss://<base>/live/sessions/<id>/attach`; Realtime: `wss://<base>/realtime?
call_id=<id>`, both derived from OPENAI_BASE_URL (http -> ws, https -> wss) and opened
with the leased key in the Authorization header (and nowhere else: frames are never
logged, only their types).

What it reads:
- `session.usage.updated` / `session.closed` (cumulative billable seconds) and
  `response.done` (token usage) become usage events, published with an ack through
  the registry's outbox, so a replica that dies loses and double-counts nothing;
- `session.updated`: a change outside the policy is reverted (`session.update` with the
  pinned values) or the session is closed, and an audit event says which.

It ends a session with `session.close` (GPT-Live) or `POST /realtime/calls/<id>/hangup`
(Realtime). A dropped connection is re-attached with backoff until the provider says
the session is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import orjson
import websockets
import websockets.exceptions
from websockets.asyncio.client import ClientConnection, connect

from shared.events import AuditEvent, EventPublisher, UsageEvent
from shared.eventschema import BudgetWarning, VoiceClosed, VoicePolicyAction
from shared.metering import SpendMeter, event_fields, read_usage
from shared.pricing import Usage
from shared.ratelimit import RedisUnavailableError
from shared.voicepolicy import VoiceApi, VoicePolicy, revert_event, violations
from shared.voicesessions import VoiceRegistry, VoiceSession

from ..upstream import KeySource
from .budget import VoiceBudget, whole_seconds
from .metrics import BILLABLE_SECONDS, POLICY_ACTIONS, RECONNECTS, TOKENS

__all__ = ["Sideband", "SidebandContext", "sideband_url", "upstream_url", "voice_event_id"]

log = logging.getLogger(__name__)
# websockets logs the handshake headers (the Authorization header with the provider key)
# and every frame at DEBUG; its logger for sidebands never goes below WARNING.
_WS_LOG = logging.getLogger("keyveil.voice.websocket")
_WS_LOG.setLevel(logging.WARNING)

# Reconnect back-off; a session whose sideband cannot be re-attached within about a
# minute is given up (and counted) rather than retried forever.
_BACKOFF = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0)
_GIVE_UP_AFTER = 12
_CLOSE_WAIT_S = 1.5
_GONE = frozenset({404, 410})
# A session reverted this often is closed on the next violation instead.
_MAX_REVERTS = 3
_BUDGET_WARNING = 0.9  # share of a budget at which a live session gets its warning event


def upstream_url(base_url: str, suffix: str) -> str:
    return f"{base_url.rstrip('/')}{suffix}"


def sideband_url(base_url: str, api: VoiceApi, session_id: str) -> str:
    """The sideband WebSocket URL for a session, from OPENAI_BASE_URL."""
    url = urlsplit(base_url.rstrip("/"))
    scheme = {"http": "ws", "https": "wss"}[url.scheme]
    if api is VoiceApi.live:
        path, query = f"{url.path}/live/sessions/{quote(session_id, safe='')}/attach", ""
    else:
        path, query = f"{url.path}/realtime", f"call_id={quote(session_id, safe='')}"
    return urlunsplit((scheme, url.netloc, path, query, ""))


def voice_event_id(*parts: object) -> str:
    """The same on every replica: JetStream and the budgets count an event once by it."""
    return hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class SidebandContext:
    """What every sideband of a replica shares."""

    base_url: str
    keys: KeySource
    http: httpx.AsyncClient
    registry: VoiceRegistry
    publisher: EventPublisher | None
    policy: VoicePolicy
    replica: str
    open_timeout_s: float = 5.0
    spend: SpendMeter | None = None  # prices voice usage (shared.pricing)
    budget: VoiceBudget | None = None  # charged every tick: a warning at 90 %, the end at 100 %


class Sideband:
    """Holds one session's sideband until the session ends or this replica lets go."""

    def __init__(self, ctx: SidebandContext, record: VoiceSession) -> None:
        self.ctx = ctx
        self.record = record
        self.api = VoiceApi(record.api)
        self.ended = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._ending: str | None = None
        self._closed_seen = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._let_go = False
        self._closer: asyncio.Task[None] | None = None
        self._reverts = 0
        self._budget_warned = False

    @property
    def session_id(self) -> str:
        return self.record.id

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"sideband-{self.api.value}"
        )

    async def let_go(self) -> None:
        """Stop holding the sideband without ending the session (lease lost, shutdown)."""
        self._let_go = True
        if self.ctx.budget is not None:
            self.ctx.budget.forget(self.record)
        await self._stop_task()

    async def end(self, reason: str) -> None:
        """End the session upstream, within ~2 s, and record why."""
        if self._ending is not None or self.ended.is_set():
            return
        self._ending = reason
        with contextlib.suppress(Exception):
            await self.ctx.registry.update(self.session_id, status="closing")
        try:
            async with asyncio.timeout(_CLOSE_WAIT_S + 0.4):
                if self.api is VoiceApi.live and self._ws is not None:
                    await self._send({"type": "session.close"})
                    await asyncio.wait_for(self._closed_seen.wait(), _CLOSE_WAIT_S)
                else:
                    await self._hangup()
        except (TimeoutError, OSError, httpx.HTTPError, websockets.exceptions.WebSocketException):
            log.warning("voice session did not confirm its close (%s)", reason)
        await self._finish(reason)
        await self._stop_task()

    async def _stop_task(self) -> None:
        task = self._task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()

    # -- the connection --------------------------------------------------------------

    async def _run(self) -> None:
        await self._flush_outbox()
        failures = 0
        attached_once = False
        while not self.ended.is_set() and not self._let_go:
            try:
                authorization, _ = await self.ctx.keys.authorization()
                async with connect(
                    sideband_url(self.ctx.base_url, self.api, self.session_id),
                    additional_headers={"Authorization": authorization},
                    open_timeout=self.ctx.open_timeout_s,
                    compression=None,
                    proxy=None,
                    max_size=1024 * 1024,
                    max_queue=4,
                    close_timeout=1.0,
                    user_agent_header="keyveil-proxy",
                    logger=_WS_LOG,
                ) as ws:
                    del authorization
                    self._ws = ws
                    if attached_once or self.record.attachments:
                        RECONNECTS.labels(self.api.value).inc()
                    attached_once = True
                    self.record.attachments += 1
                    await self.ctx.registry.update(
                        self.session_id, attachments=self.record.attachments
                    )
                    failures = 0
                    async for raw in ws:
                        await self._on_frame(raw)
                        if self.ended.is_set():
                            return
            except websockets.exceptions.InvalidStatus as exc:
                if exc.response.status_code in _GONE:
                    await self._finish("upstream_gone")
                    return
                failures += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a dropped or refused connection: re-attach
                log.info("voice sideband dropped (%s)", type(exc).__name__)
                failures += 1
            finally:
                self._ws = None
            if self._closed_seen.is_set() or self.ended.is_set():
                return
            if failures >= _GIVE_UP_AFTER:
                await self._finish("sideband_lost")
                return
            await asyncio.sleep(_BACKOFF[min(failures, len(_BACKOFF) - 1)])

    async def _send(self, event: dict[str, Any]) -> None:
        ws = self._ws
        if ws is None:
            raise ConnectionError("no sideband")
        await ws.send(orjson.dumps(event).decode())

    async def _hangup(self) -> None:
        authorization, _ = await self.ctx.keys.authorization()
        kind = "live/sessions" if self.api is VoiceApi.live else "realtime/calls"
        suffix = f"/{kind}/{quote(self.session_id, safe='')}/hangup"
        answer = await self.ctx.http.post(
            upstream_url(self.ctx.base_url, suffix), headers={"Authorization": authorization}
        )
        del authorization
        if answer.status_code >= 400 and answer.status_code not in _GONE:
            raise httpx.HTTPStatusError("hangup refused", request=answer.request, response=answer)

    # -- frames ----------------------------------------------------------------------

    async def _on_frame(self, raw: str | bytes) -> None:
        try:
            frame = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if not isinstance(frame, dict):
            return
        kind = frame.get("type")
        if kind == "session.usage.updated":
            await self._bill_seconds(frame.get("usage"))
        elif kind == "session.closed":
            await self._bill_seconds(frame.get("usage"))
            self._closed_seen.set()
            reason = self._ending or str(frame.get("reason") or "closed")
            await self._finish(reason)
        elif kind == "response.done":
            await self._bill_tokens(frame.get("response"))
        elif kind in ("session.updated", "session.created"):
            session = frame.get("session")
            if isinstance(session, dict):
                await self._check_policy(session)
        elif kind == "error":
            error = frame.get("error")
            code = error.get("code") if isinstance(error, dict) else None
            log.info("voice sideband error event (%s)", str(code)[:64])

    async def _check_policy(self, observed: dict[str, Any]) -> None:
        found = violations(observed, self.record.pinned, self.ctx.policy, self.api)
        if not found:
            return
        revert = revert_event(found, self.record.pinned, self.ctx.policy, self.api)
        self._reverts += 1
        if self._reverts > _MAX_REVERTS:
            revert = None  # it keeps coming back: the provider or the browser insists
        action: Literal["reverted", "closed"] = "reverted" if revert is not None else "closed"
        POLICY_ACTIONS.labels(self.api.value, action).inc()
        self._audit(
            f"voice.policy.{action}",
            outcome="denied",
            detail=VoicePolicyAction(
                **self._about(), fields=found, action=action, cause="session.updated"
            ),
        )
        if revert is not None:
            try:
                await self._send(revert)
                return
            except (ConnectionError, websockets.exceptions.WebSocketException):
                pass
        # Not awaited here: this runs in the reader, which must go on to read session.closed.
        self._closer = asyncio.get_running_loop().create_task(self.end("policy_violation"))

    # -- usage, through the outbox ---------------------------------------------------

    async def _bill_seconds(self, usage: Any) -> None:
        seconds = usage.get("seconds") if isinstance(usage, dict) else None
        if not isinstance(seconds, int | float) or isinstance(seconds, bool):
            return
        total = float(seconds)
        if total <= self.record.billed_s:
            return  # cumulative: an older or repeated report adds nothing
        delta = round(total - self.record.billed_s, 3)
        priced = self._price(Usage(seconds=delta), already=Usage(seconds=self.record.billed_s))
        event = self._usage(
            voice_event_id(self.session_id, "seconds", total),
            seconds=delta,
            seconds_total=total,
            **priced,
        )
        await self._commit(event, billed_s=total)
        BILLABLE_SECONDS.labels(self.api.value).inc(delta)

    async def _bill_tokens(self, response: Any) -> None:
        if not isinstance(response, dict):
            return
        usage = response.get("usage")
        if not isinstance(usage, dict):
            return
        total = usage.get("total_tokens")
        inputs = usage.get("input_tokens")
        outputs = usage.get("output_tokens")
        ident = response.get("id") or voice_event_id(orjson.dumps(usage))
        metered = read_usage(usage)
        fields: dict[str, Any] = {
            "prompt_tokens": inputs if isinstance(inputs, int) else None,
            "completion_tokens": outputs if isinstance(outputs, int) else None,
            "total_tokens": total if isinstance(total, int) else None,
        }
        if metered is not None:
            fields.update(self._price(metered))
        event = self._usage(voice_event_id(self.session_id, "response", ident), **fields)
        tokens = self.record.tokens + (total if isinstance(total, int) else 0)
        await self._commit(event, tokens=tokens)
        if isinstance(total, int):
            TOKENS.labels(self.api.value).inc(total)

    async def _charge_budgets(self, event: UsageEvent) -> None:
        """Count an acked usage event against the budgets (once per event id, so a
        replayed outbox adds nothing); warn at 90 %, end the session when its hold
        cannot be topped up (100 %). Runs before the watermark moves."""
        budget = self.ctx.budget
        if budget is None:
            return
        seconds = 0
        if event.seconds_total is not None:
            seconds = whole_seconds(self.record.billed_s, event.seconds_total)
        try:
            found = await budget.charge(
                self.record,
                event_id=event.event_id,
                seconds=seconds,
                tokens=event.total_tokens or 0,
                micros=event.cost_micros or 0,
            )
        except RedisUnavailableError as exc:
            log.warning("voice usage not charged to budgets, redis unavailable (%s)", exc)
            return
        if found is None:
            return
        if found.share >= _BUDGET_WARNING and not self._budget_warned:
            self._budget_warned = True
            if self.ctx.publisher is not None:
                warning = self._usage(
                    voice_event_id(self.session_id, "budget-warning", found.name),
                    reason=BudgetWarning(budget=found.name[:64]),
                )
                self.ctx.publisher.emit(warning.model_copy(update={"type": "voice.budget.warning"}))
        if found.short is not None and self._ending is None and not self.ended.is_set():
            log.warning("voice session over budget %s; ending it", found.short)
            # Not awaited here: this runs in the reader, which must go on to read session.closed.
            self._closer = asyncio.get_running_loop().create_task(self.end("budget_exceeded"))

    def _price(self, usage: Usage, *, already: Usage | None = None) -> dict[str, Any]:
        """The event's metered fields, with the cost by the price table (shared.pricing)."""
        if self.ctx.spend is None:
            return {}
        priced = self.ctx.spend.record(
            model=self.record.model, app=None, usage=usage, already=already
        )
        fields = event_fields(priced)
        fields.pop("seconds", None)  # the event's own seconds field already says it
        return {k: v for k, v in fields.items() if v is not None}

    def _usage(self, event_id: str, **fields: Any) -> UsageEvent:
        return UsageEvent(
            event_id=event_id,
            service="proxy",
            type="voice.usage",
            mode="voice",
            token_id=self.record.token_id,
            session_id=self.record.token_session,
            voice_session_id=self.session_id,
            path="/live/sessions" if self.api is VoiceApi.live else "/realtime/calls",
            model=self.record.model,
            **fields,
        )

    async def _commit(self, event: UsageEvent, **watermark: Any) -> None:
        """Outbox: record the event, publish it with an ack, charge the budgets, then
        move the watermark (a replica taking over redoes the last two, same ids)."""
        payload = event.model_dump_json()
        await self.ctx.registry.update(self.session_id, pending_event=payload)
        await self._publish_acked(event)
        await self._charge_budgets(event)
        for name, value in watermark.items():
            setattr(self.record, name, value)
        await self.ctx.registry.update(self.session_id, pending_event=None, **watermark)

    async def _flush_outbox(self) -> None:
        """A replica that died between recording and acking: publish it again, same id."""
        pending = self.record.pending_event
        if not pending:
            return
        event = UsageEvent.model_validate_json(pending)
        await self._publish_acked(event)
        await self._charge_budgets(event)
        update: dict[str, Any] = {"pending_event": None}
        if event.seconds_total is not None and event.seconds_total > self.record.billed_s:
            update["billed_s"] = self.record.billed_s = event.seconds_total
        if event.total_tokens:
            update["tokens"] = self.record.tokens = self.record.tokens + event.total_tokens
        await self.ctx.registry.update(self.session_id, **update)

    async def _publish_acked(self, event: UsageEvent) -> None:
        publisher = self.ctx.publisher
        if publisher is None:
            return
        delay = 0.1
        while True:
            try:
                await publisher.publish_now(event)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # JetStream away: hold the sideband, retry
                log.warning("voice usage event not acked (%s); retrying", type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    # -- the end ---------------------------------------------------------------------

    async def _finish(self, reason: str) -> None:
        if self.ended.is_set():
            return
        self.record.closed_reason = reason
        self.ended.set()
        with contextlib.suppress(Exception):
            await self.ctx.registry.mark_closed(self.session_id, reason)
            await self.ctx.registry.release(self.session_id, owner=self.ctx.replica)
        if self.ctx.budget is not None:
            with contextlib.suppress(Exception):  # it lapses by its TTL otherwise
                await self.ctx.budget.release(self.record)
        self._audit(
            "voice.session.closed",
            outcome="success",
            detail=VoiceClosed(
                **self._about(),
                reason=reason[:64],
                billed_s=self.record.billed_s,
                duration_s=round(time.time() - self.record.started_at, 3),
            ),
        )

    def _about(self) -> dict[str, Any]:
        """The fields every voice audit detail carries: which session, on which API."""
        return {
            "voice_session_id": self.session_id,
            "api": self.api.value,
            "token_id": self.record.token_id,
        }

    def _audit(self, kind: str, *, outcome: Any, detail: VoicePolicyAction | VoiceClosed) -> None:
        if self.ctx.publisher is None:
            return
        self.ctx.publisher.emit(
            AuditEvent(
                service="proxy",
                type=kind,
                actor="proxy",
                outcome=outcome,
                provider="openai",
                detail=detail,
            )
        )
