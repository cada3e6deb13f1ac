"""Helpers for the voice tests: a browser-like aiortc peer, signed session set-up,
reading JetStream, and the fake's session state."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from aiortc import (
    AudioStreamTrack,
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy

from shared.events import AUDIT_STREAM, USAGE_STREAM
from shared.testing import fake_voice  # noqa: F401 - keeps this process's ICE on loopback
from shared.tokens import Scope
from tests.support import TEST_PROVIDER_KEY, FakeUpstream

from .conftest import PREFIX, Browser

LIVE = f"{PREFIX}/live/sessions"
CALLS = f"{PREFIX}/realtime/calls"
VOICE = (Scope.voice,)


@dataclass
class Peer:
    """What a browser holds in a voice session: a peer with a mic and `oai-events`."""

    pc: RTCPeerConnection
    channel: RTCDataChannel
    events: list[dict[str, Any]] = field(default_factory=list)
    audio_frames: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    def seen(self, kind: str) -> bool:
        return any(e.get("type") == kind for e in self.events)


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(AudioStreamTrack())
    held = Peer(pc=pc, channel=pc.createDataChannel("oai-events"))

    @held.channel.on("message")
    def on_message(message: str | bytes) -> None:
        held.events.append(json.loads(message))

    async def listen(track: MediaStreamTrack) -> None:
        try:
            while True:
                await track.recv()
                held.audio_frames += 1
        except MediaStreamError:
            return

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        held.tasks.append(asyncio.ensure_future(listen(track)))

    yield held
    await pc.close()
    for task in held.tasks:
        task.cancel()


@pytest.fixture
def voice_fake(upstream: FakeUpstream) -> FakeUpstream:
    upstream.behave(voice_tick_ms=100)
    return upstream


async def until(condition: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


def fake_session(fake: FakeUpstream, session_id: str) -> dict[str, Any]:
    response = httpx.get(f"{fake.url}/_fake/sessions/{session_id}")
    response.raise_for_status()
    return dict(response.json())


@dataclass
class _Cursor:
    """What has been read of one stream's subject so far, and where to go on from."""

    next_seq: int = 1
    events: list[dict[str, Any]] = field(default_factory=list)


# Per (server, stream, subject): the proxy tests share one NATS whose usage stream holds
# every event of the package by the time the voice tests poll it; re-reading it all on
# every poll took seconds and ran past their deadlines.
_CURSORS: dict[tuple[str, str, str], _Cursor] = {}


async def stream_events(bus: NATS, stream: str, subject: str) -> list[dict[str, Any]]:
    """The events in `stream` on `subject` up to now (read on from the last call)."""
    js = bus.jetstream()
    last = (await js.stream_info(stream)).state.last_seq
    cursor = _CURSORS.setdefault((str(bus.connected_url), stream, subject), _Cursor())
    if last < cursor.next_seq:
        return list(cursor.events)
    sub = await js.pull_subscribe(
        subject,
        stream=stream,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=cursor.next_seq,
            inactive_threshold=30,
        ),
    )
    try:
        done = False
        while not done:
            try:
                batch = await sub.fetch(256, timeout=0.5)
            except TimeoutError:
                break
            for msg in batch:
                cursor.events.append(json.loads(msg.data))
                cursor.next_seq = msg.metadata.sequence.stream + 1
                done = done or msg.metadata.sequence.stream >= last
    finally:
        await sub.unsubscribe()
    return list(cursor.events)


async def usage_of(bus: NATS, session_id: str) -> list[dict[str, Any]]:
    events = await stream_events(bus, USAGE_STREAM.name, "keyveil.usage.proxy")
    return [e for e in events if e.get("voice_session_id") == session_id]


async def audits_of(bus: NATS, session_id: str) -> list[dict[str, Any]]:
    events = await stream_events(bus, AUDIT_STREAM.name, "keyveil.audit.proxy")
    return [e for e in events if (e.get("detail") or {}).get("voice_session_id") == session_id]


async def open_live(browser: Browser, peer: Peer, session: Any = None) -> tuple[str, Any]:
    token = browser.token(scopes=VOICE)
    payload: dict[str, Any] = {"transport": {"type": "webrtc", "sdp": await peer.offer()}}
    if session is not None:
        payload["session"] = session
    answer = await browser.post(LIVE, orjson.dumps(payload), token)
    assert answer.status_code == 201, answer.text
    assert TEST_PROVIDER_KEY not in answer.text
    created = answer.json()
    assert set(created) == {"session", "transport"}
    assert created["transport"]["type"] == "webrtc"
    await peer.answer(created["transport"]["sdp"])
    return str(created["session"]["id"]), token


def call_form(sdp: str, session: dict[str, Any]) -> tuple[bytes, str]:
    boundary = "kvbcall0123"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="sdp"\r\n'
        f"Content-Type: application/sdp\r\n\r\n{sdp}\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="session"\r\n'
        f"Content-Type: application/json\r\n\r\n{json.dumps(session)}\r\n"
        f"--{boundary}--\r\n"
    ).encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def open_call(browser: Browser, peer: Peer, session: dict[str, Any]) -> tuple[str, Any]:
    token = browser.token(scopes=VOICE)
    body, content_type = call_form(await peer.offer(), session)
    answer = await browser.post(CALLS, body, token, content_type=content_type)
    assert answer.status_code == 201, answer.text
    assert answer.headers["content-type"].startswith("application/sdp")
    assert TEST_PROVIDER_KEY not in answer.text
    call_id = answer.headers["x-keyveil-call-id"]
    assert answer.headers["location"] == f"{CALLS}/{call_id}"
    await peer.answer(answer.text)
    return call_id, token
