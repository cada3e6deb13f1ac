"""An OpenAI-compatible fake upstream for demos, tests and benchmarks.

It answers the REST endpoints keyveil forwards to (chat completions, Responses, speech,
transcription, client secrets) and, through `fake_voice`, the voice endpoints (GPT-Live
sessions, Realtime calls, their WebRTC peers and sidebands). It records the Authorization
header of every call (so tests can prove which key reached the provider) and the usage
it reported for it (`usage`, in the units keyveil meters), and can be told to fail, to be
slow or to report random usage through `POST /_fake/behaviour`. It is the only fake in
the project: the network here reaches no real provider.

Usage is reported in OpenAI's shapes: chat `usage` with `prompt_tokens_details`
(JSON, and the final chunk of a stream that asked for `include_usage`), Responses
`usage` (JSON, and inside `response.completed`), `speech.audio.done.usage` (speech with
`stream_format: "sse"`), transcription `usage` of type `tokens` or `duration` (JSON, and
`transcript.text.done` with `stream=true`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
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
    # Usage: fixed small numbers by default; random (and recorded) with `random_usage`,
    # output never above the request's max_tokens / max_completion_tokens /
    # max_output_tokens (else `max_random_output`).
    random_usage: bool = False
    max_random_output: int = Field(default=1000, ge=1)

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


def _between(low: int, high: int) -> int:
    return low + secrets.randbelow(high - low + 1)


def _output_cap(payload: dict[str, Any], default: int) -> int:
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return min(value, default)
    return default


def _token_usage(
    payload: dict[str, Any], behaviour: Behaviour, *, fixed_output: int, body_size: int = 3000
) -> dict[str, int]:
    """Input, cached and output tokens for one text call, in keyveil's units.

    Random input is at most the body's bytes (a real tokenizer never makes more tokens
    than bytes of the request that holds them)."""
    if not behaviour.random_usage:
        return {"input_tokens": 9, "cached_tokens": 0, "output_tokens": fixed_output}
    prompt = _between(1, max(1, min(3000, body_size)))
    cached = _between(0, prompt) if secrets.randbelow(3) == 0 else 0
    output = _between(1, _output_cap(payload, behaviour.max_random_output))
    return {"input_tokens": prompt, "cached_tokens": cached, "output_tokens": output}


def _chat_usage(units: dict[str, int]) -> dict[str, Any]:
    return {
        "prompt_tokens": units["input_tokens"],
        "completion_tokens": units["output_tokens"],
        "total_tokens": units["input_tokens"] + units["output_tokens"],
        "prompt_tokens_details": {"cached_tokens": units["cached_tokens"], "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


def _responses_usage(units: dict[str, int]) -> dict[str, Any]:
    return {
        "input_tokens": units["input_tokens"],
        "input_tokens_details": {"cached_tokens": units["cached_tokens"]},
        "output_tokens": units["output_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": units["input_tokens"] + units["output_tokens"],
    }


def _response_object(
    response_id: str, model: str, text: str, usage: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed" if usage is not None else "in_progress",
        "model": model,
        "output": [
            {
                "type": "message",
                "id": f"msg_{response_id[5:]}",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ]
        if usage is not None
        else [],
        "usage": usage,
    }


def _sse_event(payload: dict[str, Any], *, named: bool = False) -> bytes:
    head = f"event: {payload['type']}\n" if named else ""
    return f"{head}data: {json.dumps(payload)}\n\n".encode()


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
        usage: dict[str, Any] = {}
        if (failure := await misbehave(request, len(body), usage=usage)) is not None:
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
        behaviour = state["behaviour"]
        if payload.get("stream"):
            options = payload.get("stream_options")
            wanted = isinstance(options, dict) and bool(options.get("include_usage"))
            units = _token_usage(
                payload, behaviour, fixed_output=behaviour.stream_chunks, body_size=len(body)
            )
            if wanted:
                usage.update(units)
            return StreamingResponse(
                _sse(completion_id, model, created, behaviour, units if wanted else None),
                media_type="text/event-stream",
            )
        units = _token_usage(payload, behaviour, fixed_output=5, body_size=len(body))
        usage.update(units)
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
                "usage": _chat_usage(units),
            }
        )

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        body = await request.body()
        usage: dict[str, Any] = {}
        if (failure := await misbehave(request, len(body), usage=usage)) is not None:
            return failure
        try:
            payload = json.loads(body)
        except ValueError:
            return _error(400, "invalid json", None)
        if not isinstance(payload, dict) or "input" not in payload:
            return _error(400, "model and input are required", None)
        model = str(payload.get("model", "gpt-4o-mini"))
        response_id = f"resp_{secrets.token_hex(8)}"
        behaviour = state["behaviour"]
        units = _token_usage(payload, behaviour, fixed_output=5, body_size=len(body))
        usage.update(units)
        if not payload.get("stream"):
            text = "Hello from the fake."
            return JSONResponse(_response_object(response_id, model, text, _responses_usage(units)))
        return StreamingResponse(
            _responses_sse(response_id, model, behaviour, _responses_usage(units)),
            media_type="text/event-stream",
        )

    @app.post("/v1/audio/speech")
    async def speech(request: Request) -> Response:
        body = await request.body()
        usage: dict[str, Any] = {}
        if (failure := await misbehave(request, len(body), usage=usage)) is not None:
            return failure
        try:
            payload = json.loads(body or b"{}")
        except ValueError:
            return _error(400, "invalid json", None)
        text = payload.get("input") if isinstance(payload, dict) else None
        characters = len(text) if isinstance(text, str) else 0
        chunks = state["behaviour"].stream_chunks
        if isinstance(payload, dict) and payload.get("stream_format") == "sse":
            behaviour = state["behaviour"]
            inputs = max(1, characters // 4)
            outputs = _between(50, 5000) if behaviour.random_usage else 100 * chunks
            usage.update({"input_tokens": inputs, "audio_output_tokens": outputs})
            usage["output_tokens"] = outputs
            done = {
                "type": "speech.audio.done",
                "usage": {
                    "input_tokens": inputs,
                    "output_tokens": outputs,
                    "total_tokens": inputs + outputs,
                },
            }

            async def events() -> AsyncIterator[bytes]:
                audio = base64.b64encode(FAKE_AUDIO_CHUNK).decode()
                for _ in range(chunks):
                    yield _sse_event({"type": "speech.audio.delta", "audio": audio})
                    await asyncio.sleep(state["behaviour"].chunk_delay_ms / 1000)
                yield _sse_event(done)

            return StreamingResponse(events(), media_type="text/event-stream")
        # Plain audio carries no usage: what is billed is the input's characters.
        usage["characters"] = characters

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
        usage: dict[str, Any] = {}
        if (failure := await misbehave(request, size, usage=usage)) is not None:
            return failure
        model = form.get("model")
        if upload is None or isinstance(upload, str) or not model:
            return _error(400, "file and model are required", None)
        text = f"transcribed {size} bytes"
        behaviour = state["behaviour"]
        reported: dict[str, Any]
        if model == "whisper-1":
            # Billed per minute: the audio's duration, in whole seconds as OpenAI reports.
            seconds = _between(1, 600) if behaviour.random_usage else max(1, size // 16_000)
            usage["seconds"] = seconds
            reported = {"type": "duration", "seconds": seconds}
        else:
            audio = _between(10, 20_000) if behaviour.random_usage else max(1, size // 100)
            prompt = _between(0, 200) if behaviour.random_usage else 0
            output = _between(1, 2000) if behaviour.random_usage else len(text.split())
            usage.update(
                {
                    "input_tokens": audio + prompt,
                    "audio_input_tokens": audio,
                    "output_tokens": output,
                }
            )
            reported = {
                "type": "tokens",
                "input_tokens": audio + prompt,
                "input_token_details": {"text_tokens": prompt, "audio_tokens": audio},
                "output_tokens": output,
                "total_tokens": audio + prompt + output,
            }
        if form.get("stream") == "true":

            async def events() -> AsyncIterator[bytes]:
                for word in text.split():
                    yield _sse_event({"type": "transcript.text.delta", "delta": word + " "})
                yield _sse_event({"type": "transcript.text.done", "text": text, "usage": reported})

            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse({"text": text, "usage": reported})

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
    completion_id: str,
    model: str,
    created: int,
    behaviour: Behaviour,
    usage: dict[str, int] | None,
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
    if usage is not None:
        final = {**base, "model": model, "choices": [], "usage": _chat_usage(usage)}
        yield f"data: {json.dumps(final)}\n\n".encode()
    yield b"data: [DONE]\n\n"


async def _responses_sse(
    response_id: str, model: str, behaviour: Behaviour, usage: dict[str, Any]
) -> AsyncIterator[bytes]:
    """The Responses API's semantic events; no `[DONE]`: `response.completed` ends it."""
    yield _sse_event(
        {"type": "response.created", "response": _response_object(response_id, model, "", None)},
        named=True,
    )
    words = ["Hello", " from", " the", " fake", " stream", "."]
    text = ""
    for i in range(behaviour.stream_chunks):
        delta = words[i % len(words)]
        text += delta
        event = {"type": "response.output_text.delta", "output_index": 0, "delta": delta}
        yield _sse_event(event, named=True)
        if behaviour.chunk_delay_ms:
            await asyncio.sleep(behaviour.chunk_delay_ms / 1000)
    done = _response_object(response_id, model, text, usage)
    yield _sse_event({"type": "response.completed", "response": done}, named=True)


if __name__ == "__main__":
    main()
