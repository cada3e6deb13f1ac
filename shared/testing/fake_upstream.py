"""An OpenAI-compatible fake upstream for demos, tests and benchmarks.

It answers the four REST endpoints keyveil forwards to and, through `fake_voice`, the
voice endpoints (GPT-Live sessions, Realtime calls, their WebRTC peers and sidebands). It
records the Authorization header of every call (so tests can prove which key reached the
provider), and can be told to fail or to be slow through `POST /_fake/behaviour`. It is
the only fake in the project: the network here reaches no real provider.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.requests import HTTPConnection

from shared.testing.fake_voice import VoiceFake, VoiceSettings

__all__ = ["Behaviour", "create_app", "main"]

FAKE_AUDIO_CHUNK = b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x00" * 256


class Behaviour(BaseModel):
    """How the fake misbehaves; reset with an empty body."""

    fail_status: int | None = None
    fail_paths: list[str] = []
    delay_ms: int = 0
    chunk_delay_ms: int = 0
    stream_chunks: int = 5
    retry_after: int | None = None
    # Voice: one tick bills `voice_seconds_per_tick` (GPT-Live) or one response.done
    # (Realtime) and sends a transcript delta; `voice_max_seconds` ends Live sessions.
    voice_tick_ms: int = Field(default=1000, ge=10, le=60_000)
    voice_seconds_per_tick: int = Field(default=1, ge=0)
    voice_max_seconds: int | None = None

    def voice(self) -> VoiceSettings:
        return VoiceSettings(
            tick_ms=self.voice_tick_ms,
            seconds_per_tick=self.voice_seconds_per_tick,
            max_seconds=self.voice_max_seconds,
        )


class Recorder:
    def __init__(self, limit: int = 10_000) -> None:
        self.calls: list[dict[str, Any]] = []
        self.limit = limit

    def record(self, request: HTTPConnection, body_size: int, **details: Any) -> None:
        if len(self.calls) >= self.limit:
            self.calls.pop(0)
        self.calls.append(
            {
                "path": request.url.path,
                "authorization": request.headers.get("authorization"),
                "body_size": body_size,
                "ts": time.time(),
                **details,
            }
        )


def _error(status: int, message: str, retry_after: int | None) -> JSONResponse:
    headers = {"retry-after": str(retry_after)} if retry_after is not None else None
    kind, code = {
        401: ("invalid_request_error", "invalid_api_key"),
        429: ("rate_limit_exceeded", "rate_limit_exceeded"),
    }.get(status, ("server_error", "server_error"))
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": code}},
        status_code=status,
        headers=headers,
    )


def create_app() -> FastAPI:
    state = {"behaviour": Behaviour()}
    recorder = Recorder()

    async def misbehave(request: HTTPConnection, body_size: int, **details: Any) -> Response | None:
        recorder.record(request, body_size, **details)
        behaviour = state["behaviour"]
        if behaviour.delay_ms:
            await asyncio.sleep(behaviour.delay_ms / 1000)
        if not request.headers.get("authorization", "").startswith("Bearer "):
            return _error(401, "missing bearer key", None)
        wanted = behaviour.fail_paths
        if behaviour.fail_status and (not wanted or request.url.path in wanted):
            return _error(behaviour.fail_status, "injected failure", behaviour.retry_after)
        return None

    voice = VoiceFake(settings=lambda: state["behaviour"].voice(), misbehave=misbehave)
    app = FastAPI(
        title="fake-openai",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=voice.lifespan,
    )
    voice.mount(app)

    @app.post("/_fake/behaviour")
    async def set_behaviour(behaviour: Behaviour) -> dict[str, Any]:
        state["behaviour"] = behaviour
        return behaviour.model_dump()

    @app.get("/_fake/calls")
    async def calls() -> dict[str, Any]:
        return {"calls": recorder.calls}

    @app.delete("/_fake/calls")
    async def clear_calls() -> dict[str, int]:
        recorder.calls.clear()
        return {"cleared": 1}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.body()
        if (failure := await misbehave(request, len(body))) is not None:
            return failure
        try:
            payload = json.loads(body)
        except ValueError:
            return _error(400, "invalid json", None)
        if not isinstance(payload, dict):
            return _error(400, "body must be an object", None)
        model = str(payload.get("model", "gpt-4o-mini"))
        created = int(time.time())
        completion_id = f"chatcmpl-{secrets.token_hex(6)}"
        if payload.get("stream"):
            behaviour = state["behaviour"]
            options = payload.get("stream_options")
            usage = isinstance(options, dict) and bool(options.get("include_usage"))
            return StreamingResponse(
                _sse(completion_id, model, created, behaviour, usage),
                media_type="text/event-stream",
            )
        return JSONResponse(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Hello from the fake."},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14},
            }
        )

    @app.post("/v1/audio/speech")
    async def speech(request: Request) -> Response:
        body = await request.body()
        if (failure := await misbehave(request, len(body))) is not None:
            return failure
        chunks = state["behaviour"].stream_chunks

        async def audio() -> AsyncIterator[bytes]:
            for _ in range(chunks):
                yield FAKE_AUDIO_CHUNK
                await asyncio.sleep(state["behaviour"].chunk_delay_ms / 1000)

        return StreamingResponse(audio(), media_type="audio/mpeg")

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        form = await request.form(max_part_size=30 * 1024 * 1024)
        upload = form.get("file")
        size = len(await upload.read()) if upload is not None and not isinstance(upload, str) else 0
        if (failure := await misbehave(request, size)) is not None:
            return failure
        if upload is None or isinstance(upload, str) or not form.get("model"):
            return _error(400, "file and model are required", None)
        return JSONResponse({"text": f"transcribed {size} bytes"})

    @app.post("/v1/realtime/client_secrets")
    async def client_secrets(request: Request) -> Response:
        body = await request.body()
        if (failure := await misbehave(request, len(body))) is not None:
            return failure
        try:
            payload = json.loads(body or b"{}")
            seconds = int(payload.get("expires_after", {}).get("seconds", 600))
            session = {"type": "realtime", "object": "realtime.session", **payload["session"]}
        except (ValueError, TypeError, AttributeError, KeyError):
            return _error(400, "expires_after.seconds and session are required", None)
        return JSONResponse(
            {
                "value": f"ek_{secrets.token_hex(16)}",
                "expires_at": int(time.time()) + seconds,
                "session": session,
            }
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    uvicorn.run(
        create_app(),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
    )


async def _sse(
    completion_id: str, model: str, created: int, behaviour: Behaviour, usage: bool
) -> AsyncIterator[bytes]:
    base = {"id": completion_id, "object": "chat.completion.chunk", "created": created}
    words = ["Hello", " from", " the", " fake", " stream", "."]
    for i in range(behaviour.stream_chunks):
        delta = {"role": "assistant", "content": words[i % len(words)]}
        chunk = {**base, "model": model, "choices": [{"index": 0, "delta": delta}]}
        yield f"data: {json.dumps(chunk)}\n\n".encode()
        if behaviour.chunk_delay_ms:
            await asyncio.sleep(behaviour.chunk_delay_ms / 1000)
    done = {**base, "model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    yield f"data: {json.dumps(done)}\n\n".encode()
    if usage:
        tokens = {"prompt_tokens": 9, "completion_tokens": behaviour.stream_chunks}
        tokens["total_tokens"] = tokens["prompt_tokens"] + tokens["completion_tokens"]
        final = {**base, "model": model, "choices": [], "usage": tokens}
        yield f"data: {json.dumps(final)}\n\n".encode()
    yield b"data: [DONE]\n\n"


if __name__ == "__main__":
    main()
