"""What a client may ask for, parsed strictly: stable error codes, nothing echoed."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import BadRequestError

__all__ = ["MODES", "Mode", "SessionRequest", "TokenRequest", "parse_token_request"]

Mode = Literal["auto", "realtime", "proxy", "demo"]
MODES: tuple[str, ...] = ("auto", "realtime", "proxy", "demo")


class SessionRequest(BaseModel):
    """Realtime session settings a client may suggest; policy decides what is sent."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    model: str | None = Field(default=None, max_length=100)
    voice: str | None = Field(default=None, max_length=50)
    instructions: str | None = Field(default=None, max_length=4000)


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    mode: Mode = "auto"
    session: SessionRequest = Field(default_factory=SessionRequest)
    scopes: list[str] | None = Field(default=None, max_length=10)


def parse_token_request(body: bytes) -> TokenRequest:
    """The request body as a `TokenRequest`; an empty body means all defaults."""
    if not body.strip():
        return TokenRequest()
    try:
        raw: Any = json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequestError("body is not valid JSON", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise BadRequestError("body must be a JSON object", code="invalid_body")
    mode = raw.get("mode", "auto")
    if not isinstance(mode, str) or mode not in MODES:
        raise BadRequestError(f"mode must be one of {', '.join(MODES)}", code="unknown_mode")
    try:
        return TokenRequest.model_validate(raw)
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) or "body" for e in exc.errors()})
        raise BadRequestError(
            f"invalid field(s): {', '.join(fields[:5])}", code="invalid_request"
        ) from None
