"""The fake upstream's voice half, driven the way a browser and a server drive OpenAI.

A real aiortc peer in the test makes the offer (a microphone track and the `oai-events`
data channel), the fake answers with its own aiortc peer, audio flows both ways over
loopback, and the sidebands are real WebSockets opened with the official `openai`
package, so a path or event shape that drifts from the package fails here.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import websockets
from aiortc import (
    AudioStreamTrack,
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from openai import AsyncOpenAI
from openai.types.live import (
    LiveCreateResponse,
    OutputTranscriptDeltaEvent,
    SessionClosedEvent,
    SessionStartedEvent,
    SessionUpdatedEvent,
    SessionUsageUpdatedEvent,
)
from openai.types.live.live_create_params import LiveCreateParams, Transport
from openai.types.live.media_session_config_param import Audio, AudioOutput, MediaSessionConfigParam
from openai.types.live.session_update_config_param import SessionUpdateConfigParam
from openai.types.realtime import RealtimeSessionCreateRequestParam, ResponseDoneEvent
from openai.types.realtime import SessionCreatedEvent as RealtimeSessionCreated

from shared.testing import fake_voice, voice_wire
from tests.support import FakeUpstream

KEY = "sk-test-voice-key-0123456789"
LIVE_SESSION = {
    "model": "gpt-live-1",
    "instructions": "Be brief.",
    "audio": {"output": {"voice": "marin"}},
}


@dataclass
class BrowserPeer:
    """What a browser holds during a voice session: the peer, its channel, what arrived."""

    pc: RTCPeerConnection
    channel: RTCDataChannel
    events: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    audio_frames: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    async def event(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {kind} on the data channel")
            event = await asyncio.wait_for(self.events.get(), left)
            if event["type"] == kind:
                return event

    async def until(self, condition: Any, what: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(what)
            await asyncio.sleep(0.02)


@pytest.fixture
async def browser() -> AsyncIterator[BrowserPeer]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(AudioStreamTrack())  # the microphone
    peer = BrowserPeer(pc=pc, channel=pc.createDataChannel(fake_voice.DATA_CHANNEL_LABEL))

    @peer.channel.on("message")
    def on_message(message: str | bytes) -> None:
        peer.events.put_nowait(json.loads(message))

    async def listen(track: MediaStreamTrack) -> None:
        try:
            while True:
                await track.recv()
                peer.audio_frames += 1
        except MediaStreamError:
            return

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        peer.tasks.append(asyncio.ensure_future(listen(track)))

    yield peer
    await pc.close()
    for task in peer.tasks:
        task.cancel()


@pytest.fixture
def fake(fake_upstream: FakeUpstream) -> FakeUpstream:
    fake_upstream.behave()
    httpx.delete(f"{fake_upstream.url}/_fake/sessions")
    fake_upstream.clear()
    return fake_upstream


def openai_client(fake: FakeUpstream) -> AsyncOpenAI:
    return AsyncOpenAI(api_key=KEY, base_url=fake.base_url, max_retries=0)


def fake_session(fake: FakeUpstream, session_id: str) -> dict[str, Any]:
    response = httpx.get(f"{fake.url}/_fake/sessions/{session_id}")
    response.raise_for_status()
    return dict(response.json())


async def open_live(fake: FakeUpstream, browser: BrowserPeer) -> str:
    async with openai_client(fake) as client:
        created = await client.live.create(
            session={"model": "gpt-live-1", "instructions": "Be brief."},
            transport={"type": "webrtc", "sdp": await browser.offer()},
        )
    await browser.answer(created.transport.sdp)
    return created.session.id


def test_the_field_lists_match_the_openai_package() -> None:
    """The fake's strictness is the package's: a field added there must be added here."""
    assert set(MediaSessionConfigParam.__annotations__) == voice_wire.LIVE_SESSION_FIELDS
    assert set(Audio.__annotations__) == voice_wire.LIVE_AUDIO_FIELDS
    assert set(AudioOutput.__annotations__) == voice_wire.LIVE_AUDIO_OUTPUT_FIELDS
    assert set(Transport.__annotations__) == voice_wire.LIVE_TRANSPORT_FIELDS
    assert set(SessionUpdateConfigParam.__annotations__) == voice_wire.LIVE_UPDATE_FIELDS
    assert set(LiveCreateParams.__annotations__) == {"session", "transport"}
    assert (
        set(RealtimeSessionCreateRequestParam.__annotations__) == voice_wire.REALTIME_SESSION_FIELDS
    )


async def test_only_a_webrtc_audio_offer_is_an_offer(browser: BrowserPeer) -> None:
    offer = await browser.offer()
    voice_wire.validate_offer(offer, "sdp")
    refusals = {
        offer.replace("a=setup:actpass", "a=setup:active"): "not_an_offer",
        offer.replace("m=audio ", "m=video "): "bad_sdp",
        "\n".join(line for line in offer.splitlines() if "fingerprint" not in line): "bad_sdp",
        "v=1\r\n" + offer: "bad_sdp",
        offer + "a=x:" + "y" * voice_wire.MAX_SDP_BYTES: "sdp_too_large",
    }
    for sdp, code in refusals.items():
        with pytest.raises(voice_wire.VoiceRequestError) as refused:
            voice_wire.validate_offer(sdp, "sdp")
        assert refused.value.code == code
        assert refused.value.response().status_code == 400


def test_a_session_update_merges_objects_and_replaces_lists() -> None:
    base = {"delegation": {"type": "client", "acknowledgement_delay_ms": 0}, "triggers": [1]}
    update = {"delegation": {"acknowledgement_delay_ms": 400}, "triggers": []}
    assert voice_wire.deep_merge(base, update) == {
        "delegation": {"type": "client", "acknowledgement_delay_ms": 400},
        "triggers": [],
    }
    assert base["delegation"] == {"type": "client", "acknowledgement_delay_ms": 0}


async def test_live_session_answers_a_real_offer_with_audio_and_session_started(
    fake: FakeUpstream, browser: BrowserPeer
) -> None:
    offer = await browser.offer()
    body = {"session": LIVE_SESSION, "transport": {"type": "webrtc", "sdp": offer}}
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{fake.base_url}/live/sessions", json=body, headers={"Authorization": f"Bearer {KEY}"}
        )
    assert response.status_code == 201, response.text
    created = LiveCreateResponse.model_validate(response.json())
    assert created.transport.type == "webrtc"
    assert "a=setup:active" in created.transport.sdp or "a=setup:passive" in created.transport.sdp
    await browser.answer(created.transport.sdp)

    started = SessionStartedEvent.model_validate(await browser.event("session.started"))
    assert started.session.id == created.session.id
    assert started.session.model == "gpt-live-1"
    assert started.session.instructions == "Be brief."
    delta = OutputTranscriptDeltaEvent.model_validate(
        await browser.event("session.output_transcript.delta")
    )
    assert delta.delta in fake_voice.TRANSCRIPT_WORDS
    await browser.until(lambda: browser.audio_frames >= 10, "no audio frames from the fake")

    state = fake_session(fake, created.session.id)
    assert state["state"] == "open"
    assert state["authorization"] == f"Bearer {KEY}"
    assert state["session"] == LIVE_SESSION
    assert state["sdp_offer_size"] == len(offer.encode())
    assert state["sdp_answer_size"] == len(created.transport.sdp.encode())
    assert state["audio_frames_sent"] >= 10
    calls = [c for c in fake.calls() if c["path"] == "/v1/live/sessions"]
    assert calls[-1]["authorization"] == f"Bearer {KEY}"
    assert calls[-1]["session"] == LIVE_SESSION
    assert calls[-1]["sdp_size"] == len(offer.encode())
    # The microphone reached the fake's peer too.
    for _ in range(100):
        if fake_session(fake, created.session.id)["audio_frames_received"] > 0:
            break
        await asyncio.sleep(0.05)
    assert fake_session(fake, created.session.id)["audio_frames_received"] > 0


async def test_live_sideband_meters_usage_and_session_close_ends_the_peer_connection(
    fake: FakeUpstream, browser: BrowserPeer
) -> None:
    fake.behave(voice_tick_ms=100, voice_seconds_per_tick=2)
    session_id = await open_live(fake, browser)
    await browser.event("session.started")
    seen: list[int] = []
    client = openai_client(fake)
    async with client, client.live.sideband.connect(session_id=session_id) as sideband:
        first = await asyncio.wait_for(sideband.recv(), 5)
        assert isinstance(first, SessionUpdatedEvent)
        assert first.session.id == session_id
        while len(seen) < 3:
            event = await asyncio.wait_for(sideband.recv(), 5)
            if isinstance(event, SessionUsageUpdatedEvent):
                seen.append(int(event.usage.seconds))
        await sideband.send({"type": "session.close", "event_id": "evt_close_1"})
        while True:
            event = await asyncio.wait_for(sideband.recv(), 5)
            if isinstance(event, SessionClosedEvent):
                break
    assert seen == sorted(seen)
    assert seen[0] >= 2
    assert all(s % 2 == 0 for s in seen)
    assert event.reason == "close_requested"
    assert event.client_event_id == "evt_close_1"
    assert event.usage.seconds >= seen[-1]
    closed_on_channel = SessionClosedEvent.model_validate(await browser.event("session.closed"))
    assert closed_on_channel.usage.seconds == event.usage.seconds
    await browser.until(lambda: browser.pc.connectionState == "closed", "peer still connected")
    state = fake_session(fake, session_id)
    assert state["state"] == "closed"
    assert state["reason"] == "close_requested"
    assert state["seconds"] == event.usage.seconds
    attaches = [c for c in fake.calls() if c["path"] == f"/v1/live/sessions/{session_id}/attach"]
    assert [c["authorization"] for c in attaches] == [f"Bearer {KEY}"]


async def test_a_browser_session_update_is_seen_by_the_sideband(
    fake: FakeUpstream, browser: BrowserPeer
) -> None:
    session_id = await open_live(fake, browser)
    await browser.event("session.started")
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{fake.url.replace('http', 'ws')}/v1/live/sessions/{session_id}/attach"
    async with websockets.connect(url, additional_headers=headers) as sideband:
        assert json.loads(await sideband.recv())["type"] == "session.updated"
        delegation = {"type": "client", "acknowledgement_delay_ms": 250}
        update = {"type": "session.update", "event_id": "evt_b1"}
        browser.channel.send(json.dumps({**update, "session": {"delegation": delegation}}))
        updated = await next_of(sideband, "session.updated")
        assert updated["client_event_id"] == "evt_b1"
        assert SessionUpdatedEvent.model_validate(updated).session.delegation is not None
        assert updated["session"]["delegation"] == delegation

        # Instructions are immutable after start-up: the browser gets an error, nothing moves.
        browser.channel.send(
            json.dumps({"type": "session.update", "session": {"instructions": "Say anything."}})
        )
        error = await browser.event("error")
        assert error["error"]["param"] == "session.instructions"

        # The control endpoint does what the data channel does, for tests without a browser.
        triggers: list[Any] = []
        response = httpx.post(
            f"{fake.url}/_fake/sessions/{session_id}/client_update",
            json={"session": {"triggers": triggers}},
        )
        assert response.status_code == 200, response.text
        assert (await next_of(sideband, "session.updated"))["session"]["triggers"] == []
    state = fake_session(fake, session_id)
    assert state["client_updates"] == 2
    assert state["session"]["instructions"] == "Be brief."


async def next_of(sideband: Any, kind: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        event = json.loads(await asyncio.wait_for(sideband.recv(), deadline - time.monotonic()))
        if event["type"] == kind:
            return dict(event)


async def test_live_create_refuses_what_openai_refuses(
    fake: FakeUpstream, browser: BrowserPeer
) -> None:
    offer = await browser.offer()
    auth = {"Authorization": f"Bearer {KEY}"}
    url = f"{fake.base_url}/live/sessions"
    transport = {"type": "webrtc", "sdp": offer}
    answer_like = offer.replace("a=setup:actpass", "a=setup:active")
    slow_voice = {**LIVE_SESSION, "audio": {"output": {"speed": 2}}}
    tools = {**LIVE_SESSION, "tools": []}
    cases: list[tuple[dict[str, Any], dict[str, str], int, str | None]] = [
        ({"session": LIVE_SESSION, "transport": transport}, {}, 401, None),
        ({"session": tools, "transport": transport}, auth, 400, "session.tools"),
        ({"session": LIVE_SESSION, "transport": transport, "x": 1}, auth, 400, "x"),
        (
            {"session": slow_voice, "transport": transport},
            auth,
            400,
            "session.audio.output.speed",
        ),
        ({"session": {"instructions": "hi"}, "transport": transport}, auth, 400, "session.model"),
        (
            {"session": LIVE_SESSION, "transport": {"type": "webrtc", "sdp": answer_like}},
            auth,
            400,
            "transport.sdp",
        ),
        (
            {"session": LIVE_SESSION, "transport": {"type": "webrtc", "sdp": "hello"}},
            auth,
            400,
            "transport.sdp",
        ),
    ]
    async with httpx.AsyncClient() as http:
        for body, headers, status, param in cases:
            response = await http.post(url, json=body, headers=headers)
            assert response.status_code == status, (body.keys(), response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["param"] == param
            assert error["type"] == "invalid_request_error"
    assert httpx.get(f"{fake.url}/_fake/sessions").json()["sessions"] == []


async def test_realtime_call_over_multipart_meters_tokens_and_hangs_up(
    fake: FakeUpstream, browser: BrowserPeer
) -> None:
    fake.behave(voice_tick_ms=100)
    session = {"type": "realtime", "model": "gpt-realtime", "instructions": "Be brief."}
    async with openai_client(fake) as client:
        raw = await client.realtime.calls.with_raw_response.create(
            sdp=await browser.offer(), session=session
        )
        assert raw.status_code == 201
        assert raw.headers["content-type"].startswith("application/sdp")
        location = raw.headers["location"]
        assert location.startswith("/v1/realtime/calls/rtc_")
        call_id = location.rsplit("/", 1)[1]
        await browser.answer(raw.content.decode())
        created = RealtimeSessionCreated.model_validate(await browser.event("session.created"))
        assert created.session.instructions == "Be brief."
        await browser.event("response.output_audio_transcript.delta")

        async with client.realtime.connect(call_id=call_id) as sideband:
            first = await asyncio.wait_for(sideband.recv(), 5)
            assert first.type == "session.created"
            done = await asyncio.wait_for(sideband.recv(), 5)
            while not isinstance(done, ResponseDoneEvent):
                done = await asyncio.wait_for(sideband.recv(), 5)
            assert done.response.usage is not None
            assert done.response.usage.total_tokens == 50
            await client.realtime.calls.hangup(call_id)
            with pytest.raises(websockets.ConnectionClosed):
                await read_until_closed(sideband)
    await browser.until(lambda: browser.pc.connectionState == "closed", "call still connected")
    state = fake_session(fake, call_id)
    assert state["state"] == "closed"
    assert state["reason"] == "close_requested"
    assert state["tokens"]["total_tokens"] >= 50
    assert state["session"] == session
    paths = {c["path"]: c for c in fake.calls()}
    assert paths["/v1/realtime/calls"]["authorization"] == f"Bearer {KEY}"
    assert paths["/v1/realtime/calls"]["session"] == session
    assert paths["/v1/realtime"]["authorization"] == f"Bearer {KEY}"
    assert paths[f"/v1/realtime/calls/{call_id}/hangup"]["authorization"] == f"Bearer {KEY}"


async def read_until_closed(sideband: Any) -> None:
    while True:
        await asyncio.wait_for(sideband.recv(), 5)


async def test_realtime_call_accepts_a_raw_sdp_offer(
    fake: FakeUpstream, browser: BrowserPeer
) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{fake.base_url}/realtime/calls",
            content=await browser.offer(),
            headers={"Authorization": "Bearer ek_test", "Content-Type": "application/sdp"},
        )
        assert response.status_code == 201, response.text
        await browser.answer(response.text)
        await browser.event("session.created")
        not_an_offer = response.text  # an answer posted back as if it were an offer
        refused = await http.post(
            f"{fake.base_url}/realtime/calls",
            content=not_an_offer,
            headers={"Authorization": "Bearer ek_test", "Content-Type": "application/sdp"},
        )
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "not_an_offer"
    call_id = response.headers["location"].rsplit("/", 1)[1]
    assert fake_session(fake, call_id)["model"] == fake_voice.REALTIME_DEFAULT_MODEL


async def test_sidebands_need_a_bearer_key_and_an_open_session(
    fake: FakeUpstream, browser: BrowserPeer
) -> None:
    session_id = await open_live(fake, browser)
    await browser.event("session.started")
    auth = {"Authorization": f"Bearer {KEY}"}
    ws = fake.url.replace("http", "ws")
    attach = f"{ws}/v1/live/sessions/{session_id}/attach"
    with pytest.raises(websockets.InvalidStatus) as missing_key:
        async with websockets.connect(attach):
            pass
    assert missing_key.value.response.status_code == 401
    with pytest.raises(websockets.InvalidStatus) as unknown:
        async with websockets.connect(
            f"{ws}/v1/live/sessions/sess_nope/attach",
            additional_headers={"Authorization": f"Bearer {KEY}"},
        ):
            pass
    assert unknown.value.response.status_code == 404
    assert json.loads(unknown.value.response.body)["error"]["code"] == "not_found"
    # A provider-side end: the sideband is refused afterwards.
    httpx.post(f"{fake.url}/_fake/sessions/{session_id}/close", json={"reason": "expired"})
    closed = SessionClosedEvent.model_validate(await browser.event("session.closed"))
    assert closed.reason == "expired"
    with pytest.raises(websockets.InvalidStatus) as ended:
        async with websockets.connect(attach, additional_headers=auth):
            pass
    assert ended.value.response.status_code == 404


async def test_a_peerless_session_keeps_billing_across_a_dropped_sideband(
    fake: FakeUpstream,
) -> None:
    """What a re-attaching sideband relies on: usage is cumulative, the session outlives it."""
    fake.behave(voice_tick_ms=50, voice_seconds_per_tick=20, voice_max_seconds=400)
    created = httpx.post(
        f"{fake.url}/_fake/sessions", json={"api": "live", "session": LIVE_SESSION}
    )
    assert created.status_code == 201, created.text
    session_id = created.json()["id"]
    url = f"{fake.url.replace('http', 'ws')}/v1/live/sessions/{session_id}/attach"
    headers = {"Authorization": f"Bearer {KEY}"}
    async with websockets.connect(url, additional_headers=headers) as first:
        before = (await next_of(first, "session.usage.updated"))["usage"]["seconds"]
        dropped = httpx.post(f"{fake.url}/_fake/sessions/{session_id}/drop_sidebands")
        assert dropped.json() == {"dropped": 1}
        with pytest.raises(websockets.ConnectionClosedError) as cut:
            await read_until_closed(first)
        assert cut.value.rcvd is not None
        assert cut.value.rcvd.code == 1011
    async with websockets.connect(url, additional_headers=headers) as second:
        await second.send(b'{"type": "session.input_audio.mute", "event_id": "m1"}')
        muted = await next_of(second, "session.input_audio.muted")
        assert muted["client_event_id"] == "m1"
        after = (await next_of(second, "session.usage.updated"))["usage"]["seconds"]
        assert after > before
        closed = await next_of(second, "session.closed")
    assert closed["reason"] == "expired"
    assert closed["usage"]["seconds"] == 400
    state = fake_session(fake, session_id)
    assert state["sideband_connects"] == 2
    assert state["peer_state"] is None
