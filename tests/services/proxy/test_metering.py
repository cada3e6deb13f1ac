"""Metering through a real proxy: every endpoint's usage event carries the units the
fake provider reported (random, and recorded by the fake) and their cost by the table."""

from __future__ import annotations

import time
from typing import Any

import orjson
from nats.aio.client import Client as NATS

from shared.pricing import DEFAULT_PRICES_FILE, Usage, load_prices
from tests.services.proxy.conftest import (
    CHAT,
    PREFIX,
    SPEECH,
    STT,
    Browser,
    chat_body,
    multipart,
)
from tests.support import FakeUpstream

RESPONSES = f"{PREFIX}/responses"
PRICES = load_prices(DEFAULT_PRICES_FILE)


async def _event(bus: NATS, token_id: str, timeout: float = 10.0) -> dict[str, Any]:
    js = bus.jetstream()
    sub = await js.subscribe("keyveil.usage.proxy", ordered_consumer=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except TimeoutError:
                continue
            event: dict[str, Any] = orjson.loads(msg.data)
            if event.get("token_id") == token_id:
                return event
    finally:
        await sub.unsubscribe()
    raise AssertionError(f"no usage event for {token_id}")


def _reported(upstream: FakeUpstream, path: str) -> dict[str, Any]:
    calls = [c for c in upstream.calls() if c["path"] == path]
    assert len(calls) == 1
    usage: dict[str, Any] = calls[0]["usage"]
    assert usage, "the fake reported no usage"
    return usage


def _as_usage(reported: dict[str, Any]) -> Usage:
    return Usage(
        input_tokens=reported.get("input_tokens", 0),
        cached_tokens=reported.get("cached_tokens", 0),
        audio_input_tokens=reported.get("audio_input_tokens", 0),
        output_tokens=reported.get("output_tokens", 0),
        audio_output_tokens=reported.get("audio_output_tokens", 0),
        characters=reported.get("characters", 0),
        seconds=float(reported.get("seconds", 0)),
    )


def _assert_tokens_match(event: dict[str, Any], reported: dict[str, Any], model: str) -> None:
    assert event["status"] == 200
    assert event["prompt_tokens"] == reported["input_tokens"]
    assert event["completion_tokens"] == reported["output_tokens"]
    assert event["total_tokens"] == reported["input_tokens"] + reported["output_tokens"]
    assert event["cached_tokens"] == reported.get("cached_tokens", 0)
    assert event["cost_micros"] == PRICES.cost(model, _as_usage(reported))
    assert event["cost_micros"] > 0
    assert event["price_version"] == PRICES.version


async def _chat_text(response_lines: list[bytes]) -> list[dict[str, Any]]:
    chunks = []
    for line in response_lines:
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            chunks.append(orjson.loads(line[6:]))
    return chunks


async def test_chat_json_usage_is_metered_and_priced(
    browser: Browser, upstream: FakeUpstream, bus: NATS
) -> None:
    upstream.behave(random_usage=True)
    token = browser.token()
    response = await browser.post(CHAT, chat_body(max_tokens=300), token)
    assert response.status_code == 200
    reported = _reported(upstream, "/v1/chat/completions")
    assert 1 <= reported["output_tokens"] <= 300
    event = await _event(bus, token.claims.jti)
    _assert_tokens_match(event, reported, "gpt-4o-mini")
    assert response.json()["usage"]["prompt_tokens"] == reported["input_tokens"]


async def test_a_chat_stream_is_asked_for_usage_and_metered_from_its_last_chunk(
    browser: Browser, upstream: FakeUpstream, bus: NATS
) -> None:
    upstream.behave(random_usage=True, stream_chunks=4)
    token = browser.token()
    # The client did not ask for usage: the proxy does, so the stream can be metered.
    response = await browser.post(CHAT, chat_body(stream=True, model="gpt-4.1-mini"), token)
    assert response.status_code == 200
    chunks = await _chat_text(response.content.split(b"\n\n"))
    assert chunks[-1]["choices"] == []
    reported = _reported(upstream, "/v1/chat/completions")
    assert chunks[-1]["usage"]["completion_tokens"] == reported["output_tokens"]
    event = await _event(bus, token.claims.jti)
    _assert_tokens_match(event, reported, "gpt-4.1-mini")


async def test_responses_json_and_stream_are_metered(
    browser: Browser, upstream: FakeUpstream, bus: NATS
) -> None:
    upstream.behave(random_usage=True, stream_chunks=3)
    body = orjson.dumps({"model": "gpt-4o", "input": "hi", "max_output_tokens": 200})
    token = browser.token()
    response = await browser.post(RESPONSES, body, token)
    assert response.status_code == 200
    assert response.json()["object"] == "response"
    reported = _reported(upstream, "/v1/responses")
    assert reported["output_tokens"] <= 200
    _assert_tokens_match(await _event(bus, token.claims.jti), reported, "gpt-4o")

    upstream.clear()
    streamed = orjson.dumps({"model": "gpt-4o", "input": "hi", "stream": True})
    token = browser.token()
    response = await browser.post(RESPONSES, streamed, token)
    assert response.status_code == 200
    assert b"event: response.completed" in response.content
    assert b"[DONE]" not in response.content
    reported = _reported(upstream, "/v1/responses")
    _assert_tokens_match(await _event(bus, token.claims.jti), reported, "gpt-4o")


async def test_a_responses_request_is_held_to_the_chat_policy(
    browser: Browser, upstream: FakeUpstream
) -> None:
    body = orjson.dumps({"model": "o1-pro-most-expensive", "input": "hi"})
    response = await browser.post(RESPONSES, body)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "model_not_allowed"
    assert upstream.calls() == []


async def test_speech_is_metered_by_characters_or_by_its_sse_usage(
    browser: Browser, upstream: FakeUpstream, bus: NATS
) -> None:
    text = "Hello there, how are you today?"
    token = browser.token()
    body = orjson.dumps({"model": "tts-1", "voice": "alloy", "input": text})
    response = await browser.post(SPEECH, body, token)
    assert response.status_code == 200
    event = await _event(bus, token.claims.jti)
    assert _reported(upstream, "/v1/audio/speech") == {"characters": len(text)}
    assert event["characters"] == len(text)
    assert event["prompt_tokens"] is None
    assert event["cost_micros"] == PRICES.cost("tts-1", Usage(characters=len(text)))

    upstream.clear()
    upstream.behave(random_usage=True)
    token = browser.token()
    body = orjson.dumps(
        {"model": "gpt-4o-mini-tts", "voice": "alloy", "input": text, "stream_format": "sse"}
    )
    response = await browser.post(SPEECH, body, token)
    assert response.status_code == 200
    assert b"speech.audio.done" in response.content
    reported = _reported(upstream, "/v1/audio/speech")
    event = await _event(bus, token.claims.jti)
    assert event["audio_output_tokens"] == reported["audio_output_tokens"]
    _assert_tokens_match(event, reported, "gpt-4o-mini-tts")


async def test_transcription_is_metered_by_duration_or_by_tokens(
    browser: Browser, upstream: FakeUpstream, bus: NATS
) -> None:
    upstream.behave(random_usage=True)
    token = browser.token()
    body, content_type = multipart(b"RIFF" + b"\x00" * 4000, model="whisper-1")
    response = await browser.post(STT, body, token, content_type=content_type)
    assert response.status_code == 200
    reported = _reported(upstream, "/v1/audio/transcriptions")
    event = await _event(bus, token.claims.jti)
    assert event["seconds"] == reported["seconds"]
    assert event["cost_micros"] == PRICES.cost("whisper-1", Usage(seconds=reported["seconds"]))
    assert event["cost_micros"] >= 100  # $0.006 a minute is 100 micro-dollars a second

    upstream.clear()
    token = browser.token()
    body, content_type = multipart(
        b"RIFF" + b"\x00" * 4000, model="gpt-4o-transcribe", stream="true"
    )
    response = await browser.post(STT, body, token, content_type=content_type)
    assert response.status_code == 200
    assert b"transcript.text.done" in response.content
    reported = _reported(upstream, "/v1/audio/transcriptions")
    event = await _event(bus, token.claims.jti)
    assert event["audio_input_tokens"] == reported["audio_input_tokens"]
    _assert_tokens_match(event, reported, "gpt-4o-transcribe")


async def test_spend_metrics_have_bounded_labels(
    browser: Browser, upstream: FakeUpstream, bus: NATS
) -> None:
    upstream.behave(random_usage=True)
    token = browser.token()
    response = await browser.post(CHAT, chat_body(model="gpt-5-mini"), token)
    assert response.status_code == 200
    reported = _reported(upstream, "/v1/chat/completions")
    await _event(bus, token.claims.jti)
    metrics = (await browser.http.get("/metrics")).text
    cost = PRICES.cost("gpt-5-mini", _as_usage(reported))
    assert cost is not None
    line = next(
        line
        for line in metrics.splitlines()
        if line.startswith('keyveil_usage_cost_micros_total{app="none",model="gpt-5-mini"}')
    )
    assert float(line.split()[1]) >= cost
    assert 'keyveil_usage_tokens_total{app="none",kind="output",model="gpt-5-mini"}' in metrics
    assert token.claims.jti not in metrics
