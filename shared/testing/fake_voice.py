"""Voice for the fake upstream: GPT-Live sessions and Realtime calls over real WebRTC.

The fake answers a real SDP offer with a real `aiortc` peer that sends a tone back and
speaks the provider's data-channel events, and serves the two server sidebands
(`/v1/live/sessions/{id}/attach`, `/v1/realtime?call_id=`) over real WebSockets. Usage
ticks on a clock the tests can speed up (`voice_tick_ms` in `/_fake/behaviour`).

Event shapes follow the `openai` package's `types/live` and `types/realtime` modules;
what a request may contain, and how it is refused, is `voice_wire`.

Control endpoints (tests only):

- `GET /_fake/sessions`, `GET /_fake/sessions/{id}`: state of every session or call.
- `POST /_fake/sessions/{id}/client_update` `{"session": {...}}`: what a browser's
  `session.update` on the data channel does (the sidebands see `session.updated`).
- `POST /_fake/sessions/{id}/close` `{"reason": "expired"}`: the provider ends a session.
- `POST /_fake/sessions/{id}/drop_sidebands`: cut the sideband sockets, session stays up.
- `POST /_fake/sessions` `{"api": "live"|"realtime", "session": {...}}`: a session with
  no peer (201 `{"id"}`), for benchmarks that hold many sidebands without media.
- `DELETE /_fake/sessions`: end every session and forget them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import logging
import math
import secrets
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aioice.ice
from aiortc import (
    InvalidAccessError,
    InvalidStateError,
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from shared.testing.voice_wire import (
    LIVE_SESSION_FIELDS,
    LIVE_UPDATE_FIELDS,
    MAX_SDP_BYTES,
    REALTIME_SESSION_FIELDS,
    VoiceRequestError,
    deep_merge,
    error_body,
    event_id,
    live_details,
    refuse_unknown,
    validate_live_create,
    validate_offer,
    validate_realtime_session,
)

__all__ = [
    "DATA_CHANNEL_LABEL",
    "REALTIME_DEFAULT_MODEL",
    "TRANSCRIPT_WORDS",
    "VoiceFake",
    "VoiceSession",
    "VoiceSettings",
]

MAX_KEPT_SESSIONS = 10_000
LIVE_DEFAULT_VOICE = "marin"
REALTIME_DEFAULT_MODEL = "gpt-realtime"
SESSION_LIFETIME_S = 3600
DATA_CHANNEL_LABEL = "oai-events"
TRANSCRIPT_WORDS = ("Hello", " from", " the", " fake", " voice.")
# Per Realtime response.done: a fixed, recognisable token bill.
RESPONSE_TOKENS = {"input_tokens": 20, "output_tokens": 30, "total_tokens": 50}
RESPONSE_USAGE: dict[str, Any] = {
    **RESPONSE_TOKENS,
    "input_token_details": {"audio_tokens": 15, "text_tokens": 5, "cached_tokens": 0},
    "output_token_details": {"audio_tokens": 25, "text_tokens": 5},
}

TONE_RATE = 48_000
TONE_HZ = 440
FRAME_SAMPLES = 960  # 20 ms at 48 kHz, Opus's usual packet
# One second holds a whole number of 440 Hz cycles, so slicing it cyclically is seamless.
TONE_SECOND = struct.pack(
    f"<{TONE_RATE}h",
    *(int(8000 * math.sin(2 * math.pi * TONE_HZ * i / TONE_RATE)) for i in range(TONE_RATE)),
)


def _quiet_denials(record: logging.LogRecord) -> bool:
    """uvicorn logs a refused WebSocket handshake (an HTTP 401/404 we chose) as an error."""
    return record.getMessage() != "ASGI callable returned without completing handshake."


def _loopback_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return ["127.0.0.1"] if use_ipv4 else ["::1"]


# The fake's peers are always on this machine: gathering only loopback keeps every media
# packet on 127.0.0.1 (aioice otherwise offers each interface and skips loopback).
aioice.ice.get_host_addresses = _loopback_host_addresses


@dataclass(frozen=True)
class VoiceSettings:
    """The slice of `/_fake/behaviour` that voice reads on every tick."""

    tick_ms: int = 1000
    seconds_per_tick: int = 1
    max_seconds: int | None = None


class ToneTrack(MediaStreamTrack):
    """A 440 Hz tone, paced in real time: the assistant's voice."""

    kind = "audio"

    def __init__(self, on_frame: Callable[[], None]) -> None:
        super().__init__()
        self._on_frame = on_frame
        self._start: float | None = None
        self._pts = 0

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._pts += FRAME_SAMPLES
            await asyncio.sleep(max(0.0, self._start + self._pts / TONE_RATE - time.monotonic()))
        offset = (self._pts % TONE_RATE) * 2
        chunk = TONE_SECOND[offset : offset + FRAME_SAMPLES * 2]
        frame = AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(chunk)
        frame.pts = self._pts
        frame.sample_rate = TONE_RATE
        frame.time_base = fractions.Fraction(1, TONE_RATE)
        self._on_frame()
        return frame


@dataclass(eq=False)
class VoiceSession:
    """One GPT-Live session or Realtime call, as the provider sees it."""

    id: str
    api: Literal["live", "realtime"]
    config: dict[str, Any]
    authorization: str | None
    offer_size: int
    pc: RTCPeerConnection | None  # None: a peerless session made by POST /_fake/sessions
    answer_size: int = 0
    created_at: float = field(default_factory=time.time)
    closed_at: float | None = None
    state: Literal["open", "closed"] = "open"
    reason: str | None = None
    seconds: int = 0
    responses: int = 0
    tokens: dict[str, int] = field(
        default_factory=lambda: {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    )
    audio_frames_sent: int = 0
    audio_frames_received: int = 0
    channel: RTCDataChannel | None = None
    channel_events_sent: int = 0
    sidebands: set[WebSocket] = field(default_factory=set)
    sideband_connects: int = 0
    client_updates: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    transcript_index: int = 0

    def snapshot(self) -> dict[str, Any]:
        """The session resource the provider reports in session.* events."""
        if self.api == "live":
            audio = deep_merge(
                {"output": {"voice": LIVE_DEFAULT_VOICE}}, self.config.get("audio", {})
            )
            return {
                **self.config,
                "id": self.id,
                "expires_at": int(self.created_at) + SESSION_LIFETIME_S,
                "status": "active",
                "audio": audio,
            }
        return {
            "object": "realtime.session",
            "model": REALTIME_DEFAULT_MODEL,
            "expires_at": int(self.created_at) + SESSION_LIFETIME_S,
            **self.config,
        }

    def view(self) -> dict[str, Any]:
        """What `/_fake/sessions` shows tests."""
        return {
            "id": self.id,
            "api": self.api,
            "state": self.state,
            "reason": self.reason,
            "model": self.config.get("model", REALTIME_DEFAULT_MODEL),
            "session": self.config,
            "authorization": self.authorization,
            "sdp_offer_size": self.offer_size,
            "sdp_answer_size": self.answer_size,
            "seconds": self.seconds,
            "responses": self.responses,
            "tokens": dict(self.tokens),
            "created_at": self.created_at,
            "closed_at": self.closed_at,
            "peer_state": self.pc.connectionState if self.pc is not None else None,
            "data_channel": self.channel.readyState if self.channel is not None else None,
            "data_channel_events_sent": self.channel_events_sent,
            "audio_frames_sent": self.audio_frames_sent,
            "audio_frames_received": self.audio_frames_received,
            "sidebands": len(self.sidebands),
            "sideband_connects": self.sideband_connects,
            "client_updates": self.client_updates,
        }


Misbehave = Callable[..., Awaitable[Response | None]]


class VoiceFake:
    """The voice half of the fake: sessions, peers, sidebands and their clock."""

    def __init__(self, *, settings: Callable[[], VoiceSettings], misbehave: Misbehave) -> None:
        self._settings = settings
        self._misbehave = misbehave
        self.sessions: dict[str, VoiceSession] = {}

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        server_log = logging.getLogger("uvicorn.error")
        server_log.addFilter(_quiet_denials)
        try:
            yield
        finally:
            server_log.removeFilter(_quiet_denials)
            await self.close_all()

    async def close_all(self) -> None:
        for session in list(self.sessions.values()):
            await self.close(session, "connection_lost")

    # --- peers -----------------------------------------------------------------------

    async def _answer(self, session: VoiceSession, pc: RTCPeerConnection, offer: str) -> str:
        @pc.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            if channel.label != DATA_CHANNEL_LABEL:
                return
            session.channel = channel

            @channel.on("message")
            def on_message(message: str | bytes) -> None:
                self._spawn(session, self._on_channel_message(session, message))

            if channel.readyState == "open":
                self._greet_channel(session)
            else:
                channel.on("open", lambda: self._greet_channel(session))

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self._spawn(session, self._drain_microphone(session, track))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if session.state == "open" and pc.connectionState in ("failed", "closed"):
                reason = "remote_hangup" if pc.connectionState == "closed" else "connection_lost"
                await self.close(session, reason)

        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        pc.addTrack(ToneTrack(on_frame=lambda: self._count_frame(session)))
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
        return str(pc.localDescription.sdp)

    @staticmethod
    def _count_frame(session: VoiceSession) -> None:
        session.audio_frames_sent += 1

    async def _drain_microphone(self, session: VoiceSession, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while session.state == "open":
                await track.recv()
                session.audio_frames_received += 1

    def _spawn(self, session: VoiceSession, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        session.tasks.add(task)
        task.add_done_callback(session.tasks.discard)

    async def _open(
        self,
        *,
        api: Literal["live", "realtime"],
        session_id: str,
        config: dict[str, Any],
        offer: str,
        authorization: str | None,
    ) -> tuple[VoiceSession, str]:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        session = VoiceSession(
            id=session_id,
            api=api,
            config=config,
            authorization=authorization,
            offer_size=len(offer.encode()),
            pc=pc,
        )
        try:
            answer = await self._answer(session, pc, offer)
        except (ValueError, InvalidAccessError, InvalidStateError) as exc:
            await pc.close()
            raise VoiceRequestError(
                f"Invalid SDP offer: {exc}", param="sdp", code="bad_sdp"
            ) from exc
        session.answer_size = len(answer.encode())
        self._start(session)
        return session, answer

    def _start(self, session: VoiceSession) -> None:
        if len(self.sessions) >= MAX_KEPT_SESSIONS:  # a long demo run: forget the oldest ended
            ended = [s.id for s in self.sessions.values() if s.state == "closed"]
            for session_id in ended[: len(ended) // 2 + 1]:
                del self.sessions[session_id]
        self.sessions[session.id] = session
        self._spawn(session, self._tick(session))

    def open_peerless(self, api: Any, config: Any) -> VoiceSession:
        """A running session without media: sidebands, usage and close work as usual."""
        if api == "live":
            config = refuse_unknown(config, LIVE_SESSION_FIELDS, "session")
            session_id = f"sess_{secrets.token_hex(12)}"
        elif api == "realtime":
            config = validate_realtime_session(config)
            session_id = f"rtc_{secrets.token_hex(12)}"
        else:
            raise VoiceRequestError(
                "api must be live or realtime", param="api", code="invalid_value"
            )
        session = VoiceSession(
            id=session_id, api=api, config=config, authorization=None, offer_size=0, pc=None
        )
        self._start(session)
        return session

    # --- events ----------------------------------------------------------------------

    def _greet_channel(self, session: VoiceSession) -> None:
        kind = "session.started" if session.api == "live" else "session.created"
        self._send_channel(
            session, {"type": kind, "event_id": event_id(), "session": session.snapshot()}
        )

    def _channel_allows(self, session: VoiceSession, event_type: str) -> bool:
        client = session.config.get("client")
        allowed: Any = "all"
        if isinstance(client, dict) and isinstance(client.get("data_channel"), dict):
            allowed = client["data_channel"].get("allowed_server_events", "all")
        if allowed == "all" or not isinstance(allowed, list):
            return True
        names = {item if isinstance(item, str) else item.get("type") for item in allowed}
        return event_type in names

    def _send_channel(self, session: VoiceSession, event: dict[str, Any]) -> None:
        channel = session.channel
        if channel is None or channel.readyState != "open":
            return
        if session.api == "live" and not self._channel_allows(session, str(event["type"])):
            return
        channel.send(json.dumps(event))
        session.channel_events_sent += 1

    async def _send_sidebands(self, session: VoiceSession, event: dict[str, Any]) -> None:
        text = json.dumps(event)
        for ws in list(session.sidebands):
            try:
                await ws.send_text(text)
            except (RuntimeError, WebSocketDisconnect, OSError):
                session.sidebands.discard(ws)

    async def emit(
        self, session: VoiceSession, event: dict[str, Any], *, channel: bool = True
    ) -> None:
        if channel:
            self._send_channel(session, event)
        await self._send_sidebands(session, event)

    def _transcript_event(self, session: VoiceSession) -> dict[str, Any]:
        index = session.transcript_index
        word = TRANSCRIPT_WORDS[index % len(TRANSCRIPT_WORDS)]
        if index and not index % len(TRANSCRIPT_WORDS):
            word = " " + word  # the next sentence
        session.transcript_index += 1
        if session.api == "live":
            start_ms = int((time.time() - session.created_at) * 1000)
            return {
                "type": "session.output_transcript.delta",
                "event_id": event_id(),
                "delta": word,
                "start_ms": start_ms,
                "end_ms": start_ms + 200,
            }
        return {
            "type": "response.output_audio_transcript.delta",
            "event_id": event_id(),
            "response_id": f"resp_{session.responses + 1}_{session.id}",
            "item_id": f"item_{session.responses + 1}_{session.id}",
            "output_index": 0,
            "content_index": 0,
            "delta": word,
        }

    def _usage(self, session: VoiceSession) -> dict[str, Any]:
        return {"seconds": session.seconds}

    async def _bill_response(self, session: VoiceSession) -> None:
        session.responses += 1
        for key, count in RESPONSE_TOKENS.items():
            session.tokens[key] += count
        await self.emit(
            session,
            {
                "type": "response.done",
                "event_id": event_id(),
                "response": {
                    "id": f"resp_{session.responses}_{session.id}",
                    "object": "realtime.response",
                    "status": "completed",
                    "output": [],
                    "conversation_id": f"conv_{session.id}",
                    "usage": RESPONSE_USAGE,
                },
            },
        )

    async def _tick(self, session: VoiceSession) -> None:
        while session.state == "open":
            settings = self._settings()
            await asyncio.sleep(settings.tick_ms / 1000)
            if session.state != "open":
                return
            # The assistant speaks once the browser is there (peerless: from the start).
            if session.pc is None or (session.channel and session.channel.readyState == "open"):
                await self.emit(session, self._transcript_event(session))
            if session.api == "live":
                session.seconds += settings.seconds_per_tick
                usage = {"type": "session.usage.updated", "event_id": event_id()}
                await self.emit(session, {**usage, "usage": self._usage(session)})
                if settings.max_seconds is not None and session.seconds >= settings.max_seconds:
                    await self.close(session, "expired")
            else:
                await self._bill_response(session)

    async def close(
        self, session: VoiceSession, reason: str, *, client_event_id: str | None = None
    ) -> None:
        """End the session: final event, sidebands closed, peer connection closed."""
        if session.state == "closed":
            return
        session.state = "closed"
        session.reason = reason
        session.closed_at = time.time()
        if session.api == "live":
            closed: dict[str, Any] = {
                "type": "session.closed",
                "event_id": event_id(),
                "reason": reason,
                "session": session.snapshot(),
                "usage": self._usage(session),
            }
            if client_event_id is not None:
                closed["client_event_id"] = client_event_id
            await self.emit(session, closed)
        for ws in list(session.sidebands):
            with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
                await ws.close(code=1000)
        session.sidebands.clear()
        await self._flush_channel(session)
        if session.pc is not None:
            await session.pc.close()
        current = asyncio.current_task()
        for task in list(session.tasks):
            if task is not current:
                task.cancel()

    @staticmethod
    async def _flush_channel(session: VoiceSession) -> None:
        """Closing the peer aborts SCTP and drops queued chunks: let the last event leave."""
        channel = session.channel
        if channel is None or channel.readyState != "open":
            return
        if channel.bufferedAmount:
            drained = asyncio.Event()
            channel.once("bufferedamountlow", drained.set)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drained.wait(), 1.0)
        await asyncio.sleep(0.05)

    def apply_update(
        self, session: VoiceSession, update: Any, *, client_event_id: str | None
    ) -> dict[str, Any]:
        """Merge a `session.update`; raise VoiceRequestError for what the API refuses."""
        if session.api == "live":
            update = refuse_unknown(update, LIVE_UPDATE_FIELDS, "session")
            current = session.config.get("delegation")
            new = update.get("delegation")
            if (
                isinstance(current, dict)
                and isinstance(new, dict)
                and new.get("type") != current.get("type")
            ):
                raise VoiceRequestError(
                    "The delegation type cannot change.",
                    param="session.delegation.type",
                    code="invalid_value",
                )
        else:
            update = refuse_unknown(update, REALTIME_SESSION_FIELDS, "session")
            if update.get("type", "realtime") != "realtime":
                raise VoiceRequestError(
                    "session.type must be 'realtime'.", param="session.type", code="invalid_value"
                )
        session.config = deep_merge(session.config, update)
        event: dict[str, Any] = {
            "type": "session.updated",
            "event_id": event_id(),
            "session": session.snapshot(),
        }
        if client_event_id is not None:
            event["client_event_id"] = client_event_id
        return event

    async def client_event(self, session: VoiceSession, event: Any, *, from_browser: bool) -> None:
        """A client event from the data channel (browser) or a sideband (server)."""
        if not isinstance(event, dict):
            await self.emit(
                session,
                VoiceRequestError(
                    "events must be JSON objects", param=None, code="invalid_json"
                ).event(None),
                channel=from_browser,
            )
            return
        kind = event.get("type")
        client_event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        if kind == "session.update":
            try:
                updated = self.apply_update(
                    session, event.get("session"), client_event_id=client_event_id
                )
            except VoiceRequestError as refused:
                error = refused.event(client_event_id)
                if from_browser:
                    self._send_channel(session, error)
                else:
                    await self._send_sidebands(session, error)
                return
            if from_browser:
                session.client_updates += 1
            await self.emit(session, updated)
        elif kind == "session.close" and session.api == "live":
            await self.close(session, "close_requested", client_event_id=client_event_id)
        elif kind in ("session.input_audio.mute", "session.input_audio.unmute"):
            muted = "muted" if kind.endswith(".mute") else "unmuted"
            await self.emit(
                session,
                {
                    "type": f"session.input_audio.{muted}",
                    "event_id": event_id(),
                    "client_event_id": client_event_id,
                },
            )
        elif kind == "response.create" and session.api == "realtime":
            await self._bill_response(session)

    async def _on_channel_message(self, session: VoiceSession, message: str | bytes) -> None:
        try:
            event = json.loads(message)
        except ValueError:
            event = None
        await self.client_event(session, event, from_browser=True)

    # --- HTTP and WebSocket edges ----------------------------------------------------

    def mount(self, app: FastAPI) -> None:
        fake = self

        @app.post("/v1/live/sessions")
        async def create_live_session(request: Request) -> Response:
            body = await request.body()
            try:
                payload: Any = json.loads(body)
            except ValueError:
                payload = None
            details = live_details(payload)
            if (failure := await fake._misbehave(request, len(body), **details)) is not None:
                return failure
            try:
                config, offer = validate_live_create(payload)
                validate_offer(offer, "transport.sdp")
                session, answer = await fake._open(
                    api="live",
                    session_id=f"sess_{secrets.token_hex(12)}",
                    config=config,
                    offer=offer,
                    authorization=request.headers.get("authorization"),
                )
            except VoiceRequestError as refused:
                return refused.response()
            return JSONResponse(
                {"session": {"id": session.id}, "transport": {"type": "webrtc", "sdp": answer}},
                status_code=201,
            )

        @app.post("/v1/live/sessions/{session_id}/hangup")
        async def hangup_live_session(session_id: str, request: Request) -> Response:
            return await fake._hangup(request, session_id, "live")

        @app.post("/v1/realtime/calls")
        async def create_call(request: Request) -> Response:
            content_type = request.headers.get("content-type", "")
            session_part: Any = {"type": "realtime"}
            offer: Any = None
            size = 0
            if content_type.startswith("multipart/form-data"):
                form = await request.form(max_part_size=MAX_SDP_BYTES + 1)
                offer = await _form_text(form.get("sdp"))
                raw_session = await _form_text(form.get("session"))
                size = len((offer or "").encode()) + len((raw_session or "").encode())
                if raw_session is not None:
                    try:
                        session_part = json.loads(raw_session)
                    except ValueError:
                        session_part = raw_session
            else:
                body = await request.body()
                size = len(body)
                offer = body.decode(errors="replace")
            details = {
                "session": session_part,
                "sdp_size": len(offer.encode()) if isinstance(offer, str) else 0,
            }
            if (failure := await fake._misbehave(request, size, **details)) is not None:
                return failure
            try:
                if content_type.startswith("multipart/form-data") and offer is None:
                    raise VoiceRequestError(
                        "Missing required parameter: 'sdp'.", param="sdp", code="missing_required"
                    )
                if not content_type.startswith(("multipart/form-data", "application/sdp")):
                    raise VoiceRequestError(
                        "Content-Type must be application/sdp or multipart/form-data.",
                        param=None,
                        code="unsupported_content_type",
                        status=415,
                    )
                config = validate_realtime_session(session_part)
                validate_offer(offer, "sdp")
                session, answer = await fake._open(
                    api="realtime",
                    session_id=f"rtc_{secrets.token_hex(12)}",
                    config=config,
                    offer=offer,
                    authorization=request.headers.get("authorization"),
                )
            except VoiceRequestError as refused:
                return refused.response()
            return Response(
                answer,
                status_code=201,
                media_type="application/sdp",
                headers={"location": f"/v1/realtime/calls/{session.id}"},
            )

        @app.post("/v1/realtime/calls/{call_id}/hangup")
        async def hangup_call(call_id: str, request: Request) -> Response:
            return await fake._hangup(request, call_id, "realtime")

        @app.websocket("/v1/live/sessions/{session_id}/attach")
        async def live_sideband(websocket: WebSocket, session_id: str) -> None:
            await fake._sideband(websocket, session_id, "live")

        @app.websocket("/v1/realtime")
        async def realtime_sideband(websocket: WebSocket) -> None:
            call_id = websocket.query_params.get("call_id")
            if not call_id:
                await websocket.send_denial_response(
                    error_body(
                        400,
                        "This fake serves only sidebands: pass call_id.",
                        param="call_id",
                        code="missing_required",
                    )
                )
                return
            await fake._sideband(websocket, call_id, "realtime")

        @app.get("/_fake/sessions")
        async def list_sessions() -> dict[str, Any]:
            return {"sessions": [s.view() for s in fake.sessions.values()]}

        @app.post("/_fake/sessions", status_code=201)
        async def open_peerless(request: Request) -> Response:
            try:
                body = await request.json()
                session = fake.open_peerless(body.get("api"), body.get("session", {}))
            except (ValueError, AttributeError):
                return error_body(400, "invalid json", param=None, code="invalid_json")
            except VoiceRequestError as refused:
                return refused.response()
            return JSONResponse({"id": session.id}, status_code=201)

        @app.delete("/_fake/sessions")
        async def forget_sessions() -> dict[str, int]:
            count = len(fake.sessions)
            await fake.close_all()
            fake.sessions.clear()
            return {"cleared": count}

        @app.get("/_fake/sessions/{session_id}")
        async def show_session(session_id: str) -> Response:
            session = fake.sessions.get(session_id)
            if session is None:
                return error_body(404, "no such session", param=None, code="not_found")
            return JSONResponse(session.view())

        @app.post("/_fake/sessions/{session_id}/client_update")
        async def client_update(session_id: str, request: Request) -> Response:
            session = fake.sessions.get(session_id)
            if session is None or session.state != "open":
                return error_body(404, "no open session", param=None, code="not_found")
            try:
                body = await request.json()
            except ValueError:
                return error_body(400, "invalid json", param=None, code="invalid_json")
            update = body.get("session") if isinstance(body, dict) else None
            try:
                event = fake.apply_update(session, update, client_event_id=None)
            except VoiceRequestError as refused:
                return refused.response()
            session.client_updates += 1
            await fake.emit(session, event)
            return JSONResponse(event)

        @app.post("/_fake/sessions/{session_id}/close")
        async def provider_close(session_id: str, request: Request) -> Response:
            session = fake.sessions.get(session_id)
            if session is None:
                return error_body(404, "no such session", param=None, code="not_found")
            body = await request.body()
            reason = "expired"
            if body:
                with contextlib.suppress(ValueError, AttributeError):
                    reason = str(json.loads(body).get("reason", reason))
            await fake.close(session, reason)
            return JSONResponse(session.view())

        @app.post("/_fake/sessions/{session_id}/drop_sidebands")
        async def drop_sidebands(session_id: str) -> Response:
            session = fake.sessions.get(session_id)
            if session is None:
                return error_body(404, "no such session", param=None, code="not_found")
            dropped = len(session.sidebands)
            for ws in list(session.sidebands):
                with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
                    await ws.close(code=1011)
            session.sidebands.clear()
            return JSONResponse({"dropped": dropped})

    async def _hangup(self, request: Request, session_id: str, api: str) -> Response:
        if (failure := await self._misbehave(request, 0)) is not None:
            return failure
        session = self.sessions.get(session_id)
        if session is None or session.api != api:
            return error_body(
                404, f"No session with id '{session_id}'.", param=None, code="not_found"
            )
        await self.close(session, "close_requested")
        return Response(status_code=200)

    async def _sideband(self, websocket: WebSocket, session_id: str, api: str) -> None:
        failure = await self._misbehave(websocket, 0)
        if failure is not None:
            await websocket.send_denial_response(failure)
            return
        session = self.sessions.get(session_id)
        if session is None or session.api != api or session.state != "open":
            await websocket.send_denial_response(
                error_body(
                    404, f"No open session with id '{session_id}'.", param=None, code="not_found"
                )
            )
            return
        await websocket.accept()
        session.sidebands.add(websocket)
        session.sideband_connects += 1
        greeting = "session.updated" if api == "live" else "session.created"
        await websocket.send_text(
            json.dumps({"type": greeting, "event_id": event_id(), "session": session.snapshot()})
        )
        try:
            while session.state == "open":
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                try:
                    event = json.loads(message.get("text") or message.get("bytes") or b"")
                except ValueError:
                    event = None
                await self.client_event(session, event, from_browser=False)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            session.sidebands.discard(websocket)


async def _form_text(value: UploadFile | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return (await value.read()).decode(errors="replace")
