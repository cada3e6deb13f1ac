"""The token service's OpenAPI description: route keyword arguments, nothing more.

The views read their raw body themselves (`parse_token_request`), so the body schema
is declared here with `openapi_extra`; the behaviour lives in app.py and models.py.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends

from services.token.models import TokenRequest
from shared.apidocs import PROXY_TOKEN, error_responses, header, inline_schema, signature_headers

__all__ = ["ISSUE_DOCS", "LEGACY_DOCS", "REVOKE_DOCS"]

_RATE_HEADERS = {
    "RateLimit": {"description": 'IETF draft: "token_ip";r=<remaining>;t=<reset s>'},
    "RateLimit-Policy": {"description": 'IETF draft: "token_ip";q=<limit>;w=60'},
    "Cache-Control": {"description": "no-store"},
}

_ISSUED = {
    "type": "object",
    "required": ["mode", "token", "expires_at"],
    "properties": {
        "mode": {"type": "string", "enum": ["proxy", "realtime", "demo"]},
        "token": {
            "type": "string",
            "description": "proxy/demo: the proxy token (JWT); realtime: the ephemeral secret",
        },
        "expires_at": {"type": "integer", "description": "Unix seconds"},
        "token_id": {"type": "string", "description": "proxy/demo: the keyid to sign with"},
        "session_id": {"type": "string"},
        "signing_key": {
            "type": "string",
            "description": "proxy/demo: base64url HMAC key for RFC 9421 request signatures",
        },
        "proxy_url": {"type": "string"},
        "scopes": {"type": "array", "items": {"type": "string"}},
        "session": {"type": "object", "description": "realtime: the session as granted"},
        "fallback_reason": {
            "type": "string",
            "description": "auto: why a proxy token was issued instead of a realtime one",
        },
    },
}

_ISSUE_BODY = {
    "required": False,
    "description": "Optional; an empty body asks for mode auto with policy defaults.",
    "content": {"application/json": {"schema": inline_schema(TokenRequest)}},
}

_ORIGIN = header(
    "Origin", "Required; must be one of ALLOWED_ORIGINS (403 otherwise).", required=True
)
_LOGIN = header(
    "Authorization",
    "Bearer <the app's login>: an OIDC ID/access token (KEYVEIL_AUTH_MODE=oidc) or the "
    "app backend's assertion (assertion); not used in anonymous mode. Refused logins are "
    "401 login_required | login_invalid | login_expired; 503 identity_unavailable when "
    "the identity provider cannot be reached and no key is cached.",
)

ISSUE_DOCS: dict[str, Any] = {
    "summary": "Issue a proxy token or a realtime ephemeral secret",
    "responses": {
        200: {
            "description": "Issued",
            "content": {"application/json": {"schema": _ISSUED}},
            "headers": _RATE_HEADERS,
        },
        **error_responses(400, 401, 403, 413, 429, 502, 503, 504),
    },
    "openapi_extra": {"requestBody": _ISSUE_BODY, "parameters": [_ORIGIN, _LOGIN]},
}

LEGACY_DOCS: dict[str, Any] = {
    **ISSUE_DOCS,
    "summary": "Legacy alias of /api/voice-agent/secure-token",
    "deprecated": True,
    "responses": {
        200: {
            "description": "Issued (with Deprecation, Sunset and Link headers)",
            "content": {"application/json": {"schema": _ISSUED}},
            "headers": {
                **_RATE_HEADERS,
                "Deprecation": {"description": "RFC 9745: @<unix seconds>"},
                "Sunset": {"description": "RFC 8594: HTTP-date"},
                "Link": {"description": '</api/voice-agent/secure-token>; rel="successor-version"'},
            },
        },
        **error_responses(400, 401, 403, 413, 429, 502, 503, 504),
    },
}

REVOKE_DOCS: dict[str, Any] = {
    "summary": "Revoke a proxy token, proving possession with a signed request",
    "dependencies": [Depends(PROXY_TOKEN)],
    "responses": {
        200: {
            "description": "Revoked",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["revoked", "token_id", "expires_at"],
                        "properties": {
                            "revoked": {"type": "boolean", "const": True},
                            "token_id": {"type": "string"},
                            "expires_at": {"type": "integer"},
                        },
                    }
                }
            },
        },
        **error_responses(400, 401, 403, 413, 429, 503),
    },
    "openapi_extra": {"parameters": signature_headers(digest_required=False)},
}
