"""Usage tokens from upstream answers: the JSON body, or the final SSE usage chunk.

Nothing is parsed while relaying: a bounded copy is kept and parsed once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

__all__ = ["TokenUsage", "UsageTap"]

_MAX_JSON = 256 * 1024
_SSE_TAIL = 8 * 1024


@dataclass(frozen=True)
class TokenUsage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


def _from_object(payload: object) -> TokenUsage | None:
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None

    def count(name: str) -> int | None:
        value = usage.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    return TokenUsage(count("prompt_tokens"), count("completion_tokens"), count("total_tokens"))


class UsageTap:
    """Watches a relayed body for usage; `result()` after the last chunk.

    JSON answers are kept whole up to a cap; for SSE only a rolling tail is kept, since
    OpenAI sends the usage chunk last (just before `[DONE]`).
    """

    def __init__(self, *, sse: bool, json_body: bool) -> None:
        self._sse = sse
        self._json = json_body and not sse
        self._captured = b""
        self._overflow = False

    def feed(self, chunk: bytes) -> None:
        if self._sse:
            self._captured = (self._captured + chunk)[-_SSE_TAIL:]
        elif self._json and not self._overflow:
            if len(self._captured) + len(chunk) > _MAX_JSON:
                self._overflow = True
                self._captured = b""
            else:
                self._captured += chunk

    def result(self) -> TokenUsage | None:
        if not self._captured:
            return None
        if self._json:
            try:
                return _from_object(orjson.loads(self._captured))
            except orjson.JSONDecodeError:
                return None
        found: TokenUsage | None = None
        for line in self._captured.split(b"\n"):
            line = line.strip()
            if not line.startswith(b"data:") or b'"usage"' not in line:
                continue
            try:
                found = _from_object(orjson.loads(line[5:].strip())) or found
            except orjson.JSONDecodeError:
                continue
        return found
