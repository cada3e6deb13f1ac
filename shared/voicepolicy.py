"""The server-pinned voice session policy, and the upstream session built from it.

A browser asks for a voice session (GPT-Live `POST /live/sessions`, or a Realtime call
`POST /realtime/calls`); the session keyveil sends upstream is built here from
`VoicePolicy`. The browser may choose within the policy (one of the allowed models
and voices, its own instructions only where allowed, tools by name from the
allowlist), never widen it: an unknown field is refused, not forwarded.

The same policy is applied again to every `session.updated` the sideband sees
(`violations`), and says how a change outside it is undone (`revert_event`).

Errors (all `ApiError`s, mapped to HTTP by the proxy):

    BadRequestError 400   session_field_not_allowed, session_invalid
    ForbiddenError  403   model_not_allowed, voice_not_allowed,
                          instructions_not_allowed, tool_not_allowed
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.errors import BadRequestError, ForbiddenError

__all__ = [
    "DEFAULT_LIVE_MODELS",
    "DEFAULT_REALTIME_MODELS",
    "DEFAULT_VOICES",
    "VoiceApi",
    "VoicePolicy",
    "build_session",
    "revert_event",
    "violations",
]

DEFAULT_LIVE_MODELS = ("gpt-live-1", "gpt-live-1.1")
DEFAULT_REALTIME_MODELS = ("gpt-realtime", "gpt-realtime-mini")
DEFAULT_VOICES = ("marin", "cedar", "alloy", "ash", "coral", "echo", "sage", "shimmer", "verse")
CLIENT_INSTRUCTIONS = "{client_instructions}"
_MAX_INSTRUCTIONS = 16_384

# What a browser may put in its session request, per API; anything else is refused.
_CLIENT_FIELDS: dict[str, frozenset[str]] = {
    "live": frozenset({"model", "instructions", "audio"}),
    "realtime": frozenset({"type", "model", "instructions", "audio", "tools"}),
}
# Fields of a live session that may change after start-up (the rest are immutable).
_LIVE_MUTABLE = frozenset({"delegation", "triggers"})


class VoiceApi(StrEnum):
    live = "live"  # GPT-Live: POST /live/sessions, sideband /live/sessions/{id}/attach
    realtime = "realtime"  # Realtime calls: POST /realtime/calls, sideband /realtime?call_id=


class VoicePolicy(BaseModel):
    """What a brokered voice session may be. The first model and voice are the defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    live_models: list[str] = Field(default_factory=lambda: list(DEFAULT_LIVE_MODELS))
    realtime_models: list[str] = Field(default_factory=lambda: list(DEFAULT_REALTIME_MODELS))
    voices: list[str] = Field(default_factory=lambda: list(DEFAULT_VOICES))
    # The instructions sent upstream. With `client_instructions` on, the client's text
    # replaces `{client_instructions}` in the template (or follows it, without one).
    instructions: str = Field(default="You are a helpful voice assistant.", max_length=8192)
    client_instructions: bool = False
    # Function tool names a Realtime client may declare; GPT-Live delegation is server-only.
    tools: list[str] = Field(default_factory=list)
    max_session_s: int = Field(default=900, ge=5, le=4 * 3600)
    on_violation: Literal["revert", "close"] = "revert"
    max_sdp_bytes: int = Field(default=32 * 1024, ge=1024, le=256 * 1024)
    # GPT-Live only: the client events the browser's data channel may send (the
    # provider enforces it); None leaves the provider's default (all).
    browser_events: list[str] | None = None

    @field_validator("live_models", "realtime_models", "voices")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value or any(not v for v in value):
            raise ValueError("must name at least one allowed value")
        return value

    def models(self, api: VoiceApi) -> list[str]:
        return self.live_models if api is VoiceApi.live else self.realtime_models


def _refuse_unknown(requested: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(k for k in requested if k not in allowed)
    if unknown:
        # Field names only (truncated), never values.
        raise BadRequestError(
            f"{where}.{unknown[0][:64]} is not allowed by the voice policy",
            code="session_field_not_allowed",
        )


def _voice_of(requested: Mapping[str, Any], policy: VoicePolicy) -> str:
    audio = requested.get("audio")
    if audio is None:
        return policy.voices[0]
    if not isinstance(audio, dict):
        raise BadRequestError("session.audio must be an object", code="session_invalid")
    _refuse_unknown(audio, frozenset({"output"}), "session.audio")
    output = audio.get("output")
    if output is None:
        return policy.voices[0]
    if not isinstance(output, dict):
        raise BadRequestError("session.audio.output must be an object", code="session_invalid")
    _refuse_unknown(output, frozenset({"voice"}), "session.audio.output")
    voice = output.get("voice", policy.voices[0])
    if not isinstance(voice, str):
        raise ForbiddenError(
            "only the policy's built-in voices are allowed", code="voice_not_allowed"
        )
    if voice not in policy.voices:
        raise ForbiddenError("session voice is not allowed", code="voice_not_allowed")
    return voice


def _instructions_of(requested: Mapping[str, Any], policy: VoicePolicy) -> str:
    wanted = requested.get("instructions")
    if wanted is None or wanted == "":
        return policy.instructions.replace(CLIENT_INSTRUCTIONS, "").strip()
    if not isinstance(wanted, str) or len(wanted) > _MAX_INSTRUCTIONS:
        raise BadRequestError("session.instructions must be a short string", code="session_invalid")
    if not policy.client_instructions:
        raise ForbiddenError(
            "the voice policy does not let clients set instructions",
            code="instructions_not_allowed",
        )
    if CLIENT_INSTRUCTIONS in policy.instructions:
        return policy.instructions.replace(CLIENT_INSTRUCTIONS, wanted)
    return f"{policy.instructions}\n\n{wanted}" if policy.instructions else wanted


def _tools_of(requested: Mapping[str, Any], policy: VoicePolicy) -> list[dict[str, Any]]:
    tools = requested.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise BadRequestError("session.tools must be a list", code="session_invalid")
    out: list[dict[str, Any]] = []
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ForbiddenError("only allowlisted function tools", code="tool_not_allowed")
        _refuse_unknown(tool, frozenset({"type", "name", "description", "parameters"}), "tool")
        if tool.get("name") not in policy.tools:
            raise ForbiddenError("session tool is not allowed", code="tool_not_allowed")
        out.append(dict(tool))
    return out


def build_session(
    requested: Mapping[str, Any] | None, policy: VoicePolicy, api: VoiceApi
) -> dict[str, Any]:
    """The session to send upstream: the client's choices, within `policy`, or an ApiError."""
    requested = requested or {}
    if not isinstance(requested, Mapping):
        raise BadRequestError("session must be an object", code="session_invalid")
    _refuse_unknown(requested, _CLIENT_FIELDS[api.value], "session")
    if api is VoiceApi.realtime and requested.get("type", "realtime") != "realtime":
        raise BadRequestError("session.type must be realtime", code="session_invalid")
    models = policy.models(api)
    model = requested.get("model", models[0])
    if not isinstance(model, str) or model not in models:
        raise ForbiddenError("session model is not allowed", code="model_not_allowed")
    session: dict[str, Any] = {}
    if api is VoiceApi.realtime:
        session["type"] = "realtime"
    session["model"] = model
    instructions = _instructions_of(requested, policy)
    if instructions:
        session["instructions"] = instructions
    session["audio"] = {"output": {"voice": _voice_of(requested, policy)}}
    if api is VoiceApi.live and policy.browser_events is not None:
        session["client"] = {"data_channel": {"allowed_client_events": policy.browser_events}}
    if api is VoiceApi.realtime:
        tools = _tools_of(requested, policy)
        if tools:
            session["tools"] = tools
    return session


def _voice_seen(session: Mapping[str, Any]) -> Any:
    audio = session.get("audio")
    output = audio.get("output") if isinstance(audio, dict) else None
    return output.get("voice") if isinstance(output, dict) else None


def _tool_names(tools: Any) -> list[Any]:
    if not isinstance(tools, list):
        return []
    return [t.get("name", t.get("type")) if isinstance(t, dict) else t for t in tools]


def violations(
    observed: Mapping[str, Any], pinned: Mapping[str, Any], policy: VoicePolicy, api: VoiceApi
) -> list[str]:
    """Fields of a `session.updated` snapshot that left the policy (empty when none did)."""
    found: list[str] = []
    model = observed.get("model")
    if model is not None and model not in policy.models(api):
        found.append("model")
    voice = _voice_seen(observed)
    if voice is not None and voice != _voice_seen(pinned):
        found.append("audio.output.voice")
    instructions = observed.get("instructions")
    if instructions is not None and instructions != pinned.get("instructions", instructions):
        found.append("instructions")
    if any(name not in policy.tools for name in _tool_names(observed.get("tools"))):
        found.append("tools")
    delegation = observed.get("delegation")
    if delegation not in (None, pinned.get("delegation")):
        found.append("delegation")
    if observed.get("triggers") not in (None, [], pinned.get("triggers")):
        found.append("triggers")
    return found


def revert_event(
    found: list[str], pinned: Mapping[str, Any], policy: VoicePolicy, api: VoiceApi
) -> dict[str, Any] | None:
    """The `session.update` that puts the pinned values back, or None: close instead.

    GPT-Live fixes model, voice and instructions at start-up; only delegation and
    triggers can be updated, so any other drift means the session must end.
    """
    if policy.on_violation == "close" or not found:
        return None
    if api is VoiceApi.realtime:
        # Tools the client added go too: the pinned list replaces whatever is there.
        return {
            "type": "session.update",
            "session": {**pinned, "tools": list(pinned.get("tools") or [])},
        }
    if any(field not in _LIVE_MUTABLE for field in found):
        return None
    return {
        "type": "session.update",
        "session": {
            "delegation": pinned.get("delegation"),
            "triggers": list(pinned.get("triggers") or []),
        },
    }
