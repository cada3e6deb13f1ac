"""Demo mode: canned answers after every check passed; no upstream call, no key."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson

from .routes import Route

__all__ = ["DemoAnswer", "demo_response"]

_AUDIO = b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x00" * 256


@dataclass(frozen=True)
class DemoAnswer:
    """A canned answer: a whole body, or (SSE) events to stream."""

    content_type: str
    body: bytes = b""
    events: AsyncIterator[bytes] | None = None


def _chat(model: str, stream: bool) -> DemoAnswer:
    created = int(time.time())
    base = {"id": "chatcmpl-demo", "created": created, "model": model}
    if not stream:
        message = {"role": "assistant", "content": "This is a keyveil demo answer."}
        return DemoAnswer(
            "application/json",
            orjson.dumps(
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                }
            ),
        )

    async def events() -> AsyncIterator[bytes]:
        for word in ("This", " is", " a", " keyveil", " demo", " answer."):
            chunk = {
                **base,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": word}}],
            }
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
        yield b"data: [DONE]\n\n"

    return DemoAnswer("text/event-stream", events=events())


def demo_response(route: Route, *, model: str | None, stream: bool) -> DemoAnswer:
    if route.endpoint == "chat_completions":
        return _chat(model or "demo", stream)
    if route.endpoint == "audio_speech":
        return DemoAnswer("audio/mpeg", _AUDIO)
    return DemoAnswer(
        "application/json", orjson.dumps({"text": "This is a keyveil demo transcription."})
    )
