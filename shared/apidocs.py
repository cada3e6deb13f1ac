"""OpenAPI pieces the public HTTP edges share: the error body, the proxy-token scheme.

The services serve no docs (`openapi_url=None`); `keyveil openapi token|proxy` prints
the spec built from the app object, and docs/openapi/ keeps a copy that a test holds
equal to it. These pieces only describe: none of them changes how a request is handled.
"""

from __future__ import annotations

from typing import Any

from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ERROR_CODE_PATTERN",
    "PROXY_TOKEN",
    "ErrorBody",
    "ErrorDetail",
    "error_responses",
    "header",
    "inline_schema",
    "signature_headers",
]

ERROR_CODE_PATTERN = r"^[a-z][a-z0-9_]*$"

# Reads `Authorization: Bearer ...` without ever refusing (auto_error=False): the
# services check the token themselves; this only puts the scheme in the spec.
PROXY_TOKEN = HTTPBearer(
    scheme_name="proxyToken",
    bearerFormat="JWT",
    description="The proxy token from POST /api/voice-agent/secure-token (mode proxy).",
    auto_error=False,
)


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str = Field(pattern=ERROR_CODE_PATTERN, description="Stable snake_case code.")
    message: str = Field(description="Human-readable; never echoes the request.")


class ErrorBody(BaseModel):
    """Every refusal and failure: `{"error": {"code", "message"}}`."""

    error: ErrorDetail


_STATUS_TEXT = {
    400: "Malformed request (JSON, fields, signature or digest format)",
    401: "Missing, invalid or expired token or signature; replayed nonce",
    403: "Origin, scope or token mismatch; blocked client",
    404: "No such endpoint",
    405: "Method not allowed",
    413: "Body too large",
    415: "Unsupported Content-Type",
    429: "Rate limited (Retry-After, RateLimit headers)",
    502: "The provider failed or answered in an unexpected shape",
    503: "A dependency (key manager, Redis, NATS) is unavailable; retry later",
    504: "The provider did not answer in time",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries: each status named, plus 4XX/5XX catch-alls, all `ErrorBody`."""
    out: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorBody, "description": _STATUS_TEXT[status]} for status in statuses
    }
    out["4XX"] = {"model": ErrorBody, "description": "Refused: JSON error with a stable code"}
    out["5XX"] = {"model": ErrorBody, "description": "Failed: JSON error with a stable code"}
    return out


def header(
    name: str, description: str, *, required: bool = False, schema: dict[str, Any] | None = None
) -> dict[str, Any]:
    """An OpenAPI header parameter."""
    return {
        "name": name,
        "in": "header",
        "required": required,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def signature_headers(*, digest_required: bool) -> list[dict[str, Any]]:
    """RFC 9421 signature and RFC 9530 digest headers, keyed by the proxy token id."""
    return [
        header(
            "Signature-Input",
            'RFC 9421: sig1=("@method" "@path" "content-digest");created=<unix s>;'
            'keyid="<token_id>";alg="hmac-sha256";nonce="<8-128 chars, single use>"',
            required=True,
        ),
        header(
            "Signature",
            "RFC 9421: sig1=:<base64 HMAC-SHA256 of the signature base with signing_key>:",
            required=True,
        ),
        header(
            "Content-Digest",
            "RFC 9530: sha-256=:<base64 SHA-256 of the body>: (or sha-512); "
            "covered by the signature",
            required=digest_required,
        ),
        header("Origin", "When sent, must match the token's origin."),
    ]


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with its `$defs` inlined (for `openapi_extra` bodies)."""
    schema = model.model_json_schema()
    defs: dict[str, Any] = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved
