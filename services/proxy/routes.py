"""The allowlist: the only paths the proxy serves, and where each goes upstream."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from shared.tokens import Scope

__all__ = ["PREFIX", "ROUTES", "BodyKind", "Route"]

PREFIX = "/api/voice-agent/proxy/v1/"


class BodyKind(StrEnum):
    json = "json"
    multipart = "multipart"
    voice = "voice"  # an SDP offer for a brokered voice session (services.proxy.voice)


@dataclass(frozen=True)
class Route:
    endpoint: str  # metric label
    scope: Scope
    upstream_suffix: str  # joined to OPENAI_BASE_URL; never taken from the request
    body: BodyKind
    cacheable: bool = False


ROUTES: dict[str, Route] = {
    PREFIX + "chat/completions": Route(
        "chat_completions", Scope.chat, "/chat/completions", BodyKind.json
    ),
    # OpenAI's recommended text endpoint; metered from `usage` / `response.completed`.
    PREFIX + "responses": Route("responses", Scope.chat, "/responses", BodyKind.json),
    PREFIX + "audio/speech": Route(
        "audio_speech", Scope.speech, "/audio/speech", BodyKind.json, cacheable=True
    ),
    PREFIX + "audio/transcriptions": Route(
        "audio_transcriptions", Scope.transcriptions, "/audio/transcriptions", BodyKind.multipart
    ),
    PREFIX + "live/sessions": Route("voice_live", Scope.voice, "/live/sessions", BodyKind.voice),
    PREFIX + "realtime/calls": Route("voice_calls", Scope.voice, "/realtime/calls", BodyKind.voice),
}
