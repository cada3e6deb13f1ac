"""The wire shapes the fake provider holds voice requests to, as the provider would.

Field lists mirror the `openai` package's `types/live` and `types/realtime` TypedDicts
(the tests compare them), refusals use OpenAI's error body `{"error": {"message",
"type", "param", "code"}}`, and an SDP must be a WebRTC audio offer. No I/O here.
"""

from __future__ import annotations

import secrets
from typing import Any

from fastapi.responses import JSONResponse

__all__ = [
    "LIVE_AUDIO_FIELDS",
    "LIVE_AUDIO_OUTPUT_FIELDS",
    "LIVE_SESSION_FIELDS",
    "LIVE_TRANSPORT_FIELDS",
    "LIVE_UPDATE_FIELDS",
    "MAX_SDP_BYTES",
    "REALTIME_SESSION_FIELDS",
    "VoiceRequestError",
    "deep_merge",
    "error_body",
    "event_id",
    "live_details",
    "refuse_unknown",
    "validate_live_create",
    "validate_offer",
    "validate_realtime_session",
]

# MediaSessionConfigParam (POST /live/sessions "session"), strict like the provider.
LIVE_SESSION_FIELDS = frozenset(
    {
        "model",
        "audio",
        "client",
        "delegation",
        "idle_timeout_s",
        "input",
        "instructions",
        "safety_identifier",
        "store",
        "triggers",
        "wake_policy",
    }
)
LIVE_AUDIO_FIELDS = frozenset({"output"})
LIVE_AUDIO_OUTPUT_FIELDS = frozenset({"voice"})
# SessionUpdateConfigParam: the only settings a running Live session can change.
LIVE_UPDATE_FIELDS = frozenset({"delegation", "triggers"})
LIVE_TRANSPORT_FIELDS = frozenset({"type", "sdp"})
# RealtimeSessionCreateRequestParam (the "session" part of POST /realtime/calls).
REALTIME_SESSION_FIELDS = frozenset(
    {
        "type",
        "audio",
        "include",
        "instructions",
        "max_output_tokens",
        "model",
        "output_modalities",
        "parallel_tool_calls",
        "prompt",
        "reasoning",
        "tool_choice",
        "tools",
        "tracing",
        "truncation",
    }
)
MAX_SDP_BYTES = 256 * 1024


def event_id() -> str:
    return f"event_{secrets.token_hex(8)}"


def error_body(status: int, message: str, *, param: str | None, code: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "invalid_request_error"
    error = {"message": message, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": error}, status_code=status)


class VoiceRequestError(Exception):
    """A request the provider would refuse; carries the 4xx JSON error it answers with."""

    def __init__(self, message: str, *, param: str | None, code: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status

    def response(self) -> JSONResponse:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def event(self, client_event_id: str | None) -> dict[str, Any]:
        return {
            "type": "error",
            "event_id": event_id(),
            "client_event_id": client_event_id,
            "error": {
                "type": "invalid_request_error",
                "code": self.code,
                "message": self.message,
                "param": self.param,
                "client_event_id": client_event_id,
            },
        }


def refuse_unknown(obj: Any, allowed: frozenset[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise VoiceRequestError(f"'{where}' must be an object", param=where, code="invalid_type")
    for key in obj:
        if key not in allowed:
            raise VoiceRequestError(
                f"Unknown parameter: '{where}.{key}'.",
                param=f"{where}.{key}",
                code="unknown_parameter",
            )
    return obj


def validate_live_create(payload: Any) -> tuple[dict[str, Any], str]:
    """The `session` and the offer of a `POST /live/sessions` body, or a VoiceRequestError."""
    if not isinstance(payload, dict):
        raise VoiceRequestError("body must be a JSON object", param=None, code="invalid_json")
    for key in payload:
        if key not in ("session", "transport"):
            raise VoiceRequestError(
                f"Unknown parameter: '{key}'.", param=key, code="unknown_parameter"
            )
    if "session" not in payload:
        raise VoiceRequestError(
            "Missing required parameter: 'session'.", param="session", code="missing_required"
        )
    if "transport" not in payload:
        raise VoiceRequestError(
            "Missing required parameter: 'transport'.", param="transport", code="missing_required"
        )
    session = refuse_unknown(payload["session"], LIVE_SESSION_FIELDS, "session")
    if not isinstance(session.get("model"), str) or not session["model"]:
        raise VoiceRequestError(
            "Missing required parameter: 'session.model'.",
            param="session.model",
            code="missing_required",
        )
    if "audio" in session:
        audio = refuse_unknown(session["audio"], LIVE_AUDIO_FIELDS, "session.audio")
        if "output" in audio:
            refuse_unknown(audio["output"], LIVE_AUDIO_OUTPUT_FIELDS, "session.audio.output")
    transport = refuse_unknown(payload["transport"], LIVE_TRANSPORT_FIELDS, "transport")
    if transport.get("type") != "webrtc":
        raise VoiceRequestError(
            "transport.type must be 'webrtc'.", param="transport.type", code="invalid_value"
        )
    sdp = transport.get("sdp")
    if not isinstance(sdp, str):
        raise VoiceRequestError(
            "Missing required parameter: 'transport.sdp'.",
            param="transport.sdp",
            code="missing_required",
        )
    return session, sdp


def validate_realtime_session(payload: Any) -> dict[str, Any]:
    session = refuse_unknown(payload, REALTIME_SESSION_FIELDS, "session")
    if session.get("type") != "realtime":
        raise VoiceRequestError(
            "session.type must be 'realtime'.", param="session.type", code="invalid_value"
        )
    return session


def validate_offer(sdp: str, param: str) -> None:
    """Refuse what is not a WebRTC audio offer before any peer is made for it."""
    if len(sdp.encode()) > MAX_SDP_BYTES:
        raise VoiceRequestError(
            f"SDP larger than {MAX_SDP_BYTES} bytes.", param=param, code="sdp_too_large"
        )
    lines = [line.strip() for line in sdp.splitlines()]
    if not lines or lines[0] != "v=0":
        raise VoiceRequestError("Invalid SDP: it must start with v=0.", param=param, code="bad_sdp")
    if not any(line.startswith("m=audio ") for line in lines):
        raise VoiceRequestError("The SDP offer has no audio section.", param=param, code="bad_sdp")
    setups = {line.split(":", 1)[1] for line in lines if line.startswith("a=setup:")}
    # RFC 8842: an offerer says actpass; active/passive means this is an answer.
    if setups != {"actpass"}:
        raise VoiceRequestError(
            "The SDP is not an offer (a=setup must be actpass).", param=param, code="not_an_offer"
        )
    if not any(line.startswith("a=fingerprint:") for line in lines):
        raise VoiceRequestError(
            "The SDP offer has no DTLS fingerprint.", param=param, code="bad_sdp"
        )


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Sparse update: objects merge, everything else (lists included) is replaced."""
    merged = dict(base)
    for key, value in update.items():
        current = merged.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            merged[key] = deep_merge(current, value)
        else:
            merged[key] = value
    return merged


def live_details(payload: Any) -> dict[str, Any]:
    """What the recorder keeps of a Live create body: the session and the offer's size."""
    if not isinstance(payload, dict):
        return {"session": None, "sdp_size": 0}
    transport = payload.get("transport")
    sdp = transport.get("sdp") if isinstance(transport, dict) else None
    return {
        "session": payload.get("session"),
        "sdp_size": len(sdp.encode()) if isinstance(sdp, str) else 0,
    }
