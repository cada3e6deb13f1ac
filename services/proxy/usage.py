"""Usage from upstream answers: the JSON body, or the SSE event that carries it.

Nothing is parsed while relaying. A JSON answer is kept whole (up to a cap) and parsed
once at the end. An SSE answer is split into events as it passes (one `find` per
chunk); only the latest event mentioning `"usage"` is kept, bounded, and parsed at
the end: the chat stream's final chunk, the Responses API's `response.completed` (which
repeats the whole answer, hence the large bound), `speech.audio.done`,
`transcript.text.done`.

Chat streams report usage only when asked: `ask_for_usage` adds
`stream_options.include_usage` to a streaming chat request.
"""

from __future__ import annotations

import orjson

from shared.metering import usage_of
from shared.pricing import Usage

from .bodies import JsonBody
from .routes import Route

__all__ = ["UsageTap", "ask_for_usage"]

_MAX_JSON = 256 * 1024
_MAX_EVENT = 1024 * 1024
_USAGE = b'"usage"'


def ask_for_usage(route: Route, body: JsonBody) -> JsonBody:
    """A streaming chat request with `stream_options.include_usage` set (re-encoded)."""
    payload = body.payload
    if route.endpoint != "chat_completions" or payload.get("stream") is not True:
        return body
    options = payload.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return body
    extended = {**options} if isinstance(options, dict) else {}
    extended["include_usage"] = True
    changed = {**payload, "stream_options": extended}
    return JsonBody(orjson.dumps(changed), changed)


class UsageTap:
    """Watches a relayed body for usage; `result()` after the last chunk.

    `audio_output`: every output token is audio (speech). `characters`: what the call
    is billed by when the answer reports nothing (plain speech audio).
    """

    def __init__(
        self, *, sse: bool, json_body: bool, audio_output: bool = False, characters: int = 0
    ) -> None:
        self._sse = sse
        self._json = json_body and not sse
        self._audio_output = audio_output
        self._characters = characters
        self._captured = b""
        self._pending = b""
        self._skipping = False
        self._overflow = False

    def feed(self, chunk: bytes) -> None:
        if self._sse:
            self._feed_event_bytes(chunk)
        elif self._json and not self._overflow:
            if len(self._captured) + len(chunk) > _MAX_JSON:
                self._overflow = True
                self._captured = b""
            else:
                self._captured += chunk

    def _feed_event_bytes(self, chunk: bytes) -> None:
        data = self._pending + chunk if self._pending else chunk
        start = 0
        while (end := data.find(b"\n\n", start)) >= 0:
            if self._skipping:
                self._skipping = False
            else:
                event = data[start:end]
                if _USAGE in event:
                    self._captured = event
            start = end + 2
        rest = data[start:]
        if len(rest) > _MAX_EVENT:
            # An event too large to be one we read: dropped up to its end.
            self._skipping = True
            rest = rest[-1:] if rest.endswith(b"\n") else b""
        self._pending = rest

    def result(self) -> Usage | None:
        found: Usage | None = None
        if self._json and self._captured:
            try:
                found = usage_of(orjson.loads(self._captured), audio_output=self._audio_output)
            except orjson.JSONDecodeError:
                found = None
        elif self._sse:
            event = self._captured or (self._pending if _USAGE in self._pending else b"")
            for line in event.split(b"\n"):
                line = line.strip()
                if line.startswith(b"data:") and _USAGE in line:
                    try:
                        payload = orjson.loads(line[5:].strip())
                    except orjson.JSONDecodeError:
                        continue
                    found = usage_of(payload, audio_output=self._audio_output) or found
        if found is None and self._characters:
            return Usage(characters=self._characters)
        return found
