"""Demo mode: canned answers after every check passed; no upstream call, no key."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import orjson
from starlette.responses import Response, StreamingResponse

from .routes import Route

__all__ = ["demo_response"]

_AUDIO = b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x00" * 256


def _chat(model: str, stream: bool) -> Response:
    created = int(time.time())
    base = {"id": "chatcmpl-demo", "created": created, "model": model}
    if not stream:
        message = {"role": "assistant", "content": "This is a keyveil demo answer."}
        return Response(
            orjson.dumps(
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                }
            ),
            media_type="application/json",
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

    return StreamingResponse(events(), media_type="text/event-stream")


def demo_response(route: Route, *, model: str | None, stream: bool) -> Response:
    if route.endpoint == "chat_completions":
        return _chat(model or "demo", stream)
    if route.endpoint == "audio_speech":
        return Response(_AUDIO, media_type="audio/mpeg")
    return Response(
        orjson.dumps({"text": "This is a keyveil demo transcription."}),
        media_type="application/json",
    )
