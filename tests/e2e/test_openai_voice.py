"""The official `openai` package, unchanged, brokers voice sessions through keyveil:
`client.live.create(...)` and `client.realtime.calls.create(...)` with `KeyveilAuth`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from aiortc import AudioStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from keyveil.client import KeyveilAuth, TokenSource
from shared.testing import fake_voice  # noqa: F401 - keeps this process's ICE on loopback
from tests.sdp_samples import OFFER
from tests.stack import ORIGIN, Stack
from tests.support import TEST_PROVIDER_KEY

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
async def pc() -> AsyncIterator[RTCPeerConnection]:
    peer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    peer.addTrack(AudioStreamTrack())
    yield peer
    await peer.close()


async def offer_of(pc: RTCPeerConnection, events: list[dict[str, Any]]) -> str:
    channel = pc.createDataChannel("oai-events")
    channel.on("message", lambda message: events.append(json.loads(message)))
    await pc.setLocalDescription(await pc.createOffer())
    return str(pc.localDescription.sdp)


def fake_session(stack: Stack, session_id: str) -> dict[str, Any]:
    answer = httpx.get(f"{stack.url('fake_upstream')}/_fake/sessions/{session_id}")
    answer.raise_for_status()
    return dict(answer.json())


async def until_seen(events: list[dict[str, Any]], kind: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(e.get("type") == kind for e in events):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {kind} on the data channel")
        await asyncio.sleep(0.05)


async def test_openai_package_live_and_realtime_calls_through_the_proxy(
    stack: Stack, pc: RTCPeerConnection
) -> None:
    tokens = TokenSource(stack.url("token"), origin=ORIGIN)
    http = httpx.AsyncClient(auth=KeyveilAuth(tokens=tokens))
    base_url = f"{stack.url('proxy')}/api/voice-agent/proxy/v1"
    async with openai.AsyncOpenAI(
        api_key="not-a-provider-key",
        base_url=base_url,
        http_client=http,  # type: ignore[arg-type]  # openai types httpx2; httpx works too
        max_retries=0,
    ) as client:
        events: list[dict[str, Any]] = []
        created = await client.live.create(
            session={"model": "gpt-live-1", "audio": {"output": {"voice": "marin"}}},
            transport={"type": "webrtc", "sdp": await offer_of(pc, events)},
        )
        await pc.setRemoteDescription(
            RTCSessionDescription(sdp=created.transport.sdp, type="answer")
        )
        await until_seen(events, "session.started")
        live = fake_session(stack, created.session.id)
        assert live["authorization"] == f"Bearer {TEST_PROVIDER_KEY}"
        assert live["session"]["instructions"] == "You are a helpful voice assistant."

        with pytest.raises(openai.PermissionDeniedError) as refused:
            await client.live.create(
                session={"model": "gpt-live-1", "audio": {"output": {"voice": "nova"}}},
                transport={"type": "webrtc", "sdp": OFFER},  # refused before the SDP matters
            )
        assert refused.value.status_code == 403

        second = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        second.addTrack(AudioStreamTrack())
        try:
            call_events: list[dict[str, Any]] = []
            raw = await client.realtime.calls.with_raw_response.create(
                sdp=await offer_of(second, call_events),
                session={"type": "realtime", "model": "gpt-realtime"},
            )
            assert raw.status_code == 201
            call_id = raw.headers["x-keyveil-call-id"]
            assert raw.headers["location"].endswith(f"/realtime/calls/{call_id}")
            answer = raw.parse().content.decode()
            assert TEST_PROVIDER_KEY not in answer
            await second.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            await until_seen(call_events, "session.created")
            call = fake_session(stack, call_id)
            assert call["authorization"] == f"Bearer {TEST_PROVIDER_KEY}"
            assert call["model"] == "gpt-realtime"
        finally:
            await second.close()
    await http.aclose()
