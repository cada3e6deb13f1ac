"""The proxy's OpenAPI description, as documentation-only routes.

The allowlisted paths are served by `ProxyHandler` before FastAPI routes anything
(see app.py), so the routes added here never run: they exist so that
`create_app(settings).openapi()` describes the real contract.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import Response

from shared.apidocs import PROXY_TOKEN, error_responses, header, signature_headers
from shared.errors import NotFoundError

from .routes import PREFIX, ROUTES, BodyKind

__all__ = ["document_routes"]

_ANY_JSON: dict[str, Any] = {"type": "object", "description": "The provider's answer"}
_REQUEST_SCHEMAS: dict[str, dict[str, Any]] = {
    "chat/completions": {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string", "maxLength": 200},
            "messages": {
                "type": "array",
                "maxItems": 50,
                "items": {
                    "type": "object",
                    "required": ["role", "content"],
                    "properties": {
                        "role": {"type": "string", "enum": ["system", "user", "assistant"]},
                        "content": {"type": "string"},
                    },
                },
            },
            "stream": {"type": "boolean"},
            "stream_options": {
                "type": "object",
                "properties": {"include_usage": {"type": "boolean"}},
            },
            "max_tokens": {"type": "integer", "minimum": 1},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        },
    },
    "responses": {
        "type": "object",
        "required": ["model", "input"],
        "properties": {
            "model": {"type": "string", "maxLength": 200},
            "input": {
                "description": "Text, or a list of input items",
                "oneOf": [{"type": "string"}, {"type": "array", "maxItems": 50}],
            },
            "instructions": {"type": "string"},
            "stream": {"type": "boolean"},
            "max_output_tokens": {"type": "integer", "minimum": 1},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        },
    },
    "audio/speech": {
        "type": "object",
        "required": ["model", "voice", "input"],
        "properties": {
            "model": {"type": "string", "maxLength": 200},
            "voice": {"type": "string", "maxLength": 50},
            "input": {"type": "string", "maxLength": 4096},
            "response_format": {
                "type": "string",
                "enum": ["mp3", "opus", "aac", "flac", "wav", "pcm"],
            },
            "speed": {"type": "number", "minimum": 0.25, "maximum": 4},
            "stream_format": {"type": "string", "enum": ["audio", "sse"]},
        },
    },
    "audio/transcriptions": {
        "type": "object",
        "required": ["file", "model"],
        "properties": {
            "file": {"type": "string", "format": "binary"},
            "model": {"type": "string", "minLength": 1, "maxLength": 200},
            "language": {"type": "string"},
            "prompt": {"type": "string"},
            "response_format": {"type": "string", "enum": ["json", "text", "verbose_json"]},
            "stream": {"type": "string", "enum": ["true", "false"]},
        },
    },
    "live/sessions": {
        "type": "object",
        "required": ["transport"],
        "additionalProperties": False,
        "properties": {
            "session": {
                "type": "object",
                "additionalProperties": False,
                "description": "Choices within the server's voice policy",
                "properties": {
                    "model": {"type": "string", "maxLength": 200},
                    "instructions": {"type": "string"},
                    "audio": {
                        "type": "object",
                        "properties": {
                            "output": {
                                "type": "object",
                                "properties": {"voice": {"type": "string"}},
                            }
                        },
                    },
                },
            },
            "transport": {
                "type": "object",
                "required": ["type", "sdp"],
                "additionalProperties": False,
                "properties": {
                    "type": {"type": "string", "enum": ["webrtc"]},
                    "sdp": {"type": "string", "description": "The browser's SDP offer"},
                },
            },
        },
    },
    "realtime/calls": {
        "type": "object",
        "required": ["sdp"],
        "properties": {
            "sdp": {"type": "string", "description": "The browser's SDP offer"},
            "session": {
                "type": "string",
                "description": "Session JSON (type, model, instructions, audio, tools) "
                "within the server's voice policy",
            },
        },
    },
}
_ANSWERS: dict[str, dict[str, Any]] = {
    "chat/completions": {
        "application/json": {"schema": _ANY_JSON},
        "text/event-stream": {
            "schema": {
                "type": "object",
                "description": "One Server-Sent Event: data is a chat.completion.chunk "
                "as JSON, or [DONE] last",
                "required": ["data"],
                "properties": {
                    "data": {"type": "string"},
                    "event": {"type": "string"},
                    "id": {"type": "string"},
                },
            }
        },
    },
    "responses": {
        "application/json": {"schema": _ANY_JSON},
        "text/event-stream": {
            "schema": {
                "type": "object",
                "description": "One semantic Server-Sent Event (response.created, "
                "response.output_text.delta, ...), response.completed last (with usage)",
                "required": ["event", "data"],
                "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
            }
        },
    },
    "audio/speech": {
        "audio/*": {"schema": {"type": "string", "format": "binary"}},
        "text/event-stream": {
            "schema": {
                "type": "object",
                "description": 'With stream_format "sse": speech.audio.delta events, '
                "speech.audio.done (with usage) last",
                "properties": {"data": {"type": "string"}},
            }
        },
    },
    "audio/transcriptions": {
        "application/json": {"schema": _ANY_JSON},
        "text/event-stream": {
            "schema": {
                "type": "object",
                "description": "With stream=true: transcript.text.delta events, "
                "transcript.text.done (with usage) last",
                "properties": {"data": {"type": "string"}},
            }
        },
    },
    "live/sessions": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["session", "transport"],
                "properties": {
                    "session": {"type": "object", "properties": {"id": {"type": "string"}}},
                    "transport": {
                        "type": "object",
                        "properties": {"type": {"type": "string"}, "sdp": {"type": "string"}},
                    },
                },
            }
        }
    },
    "realtime/calls": {"application/sdp": {"schema": {"type": "string"}}},
}
_MEDIA = {BodyKind.multipart: "multipart/form-data", BodyKind.json: "application/json"}
_VOICE_MEDIA = {"voice_live": "application/json", "voice_calls": "multipart/form-data"}
_RATE_HEADERS = {
    "RateLimit": {"description": 'IETF draft: "per-token";r=<remaining>;t=<reset s>'},
    "RateLimit-Policy": {"description": 'IETF draft: "per-token";q=<limit>;w=60'},
}


async def _served_by_the_handler() -> Response:
    raise NotFoundError("no such proxy endpoint", code="not_found")


def document_routes(app: FastAPI) -> None:
    """Add one documentation-only POST route per allowlisted proxy path."""
    for path, route in ROUTES.items():
        name = path.removeprefix(PREFIX)
        media = _MEDIA.get(route.body) or _VOICE_MEDIA[route.endpoint]
        ok = 201 if route.body is BodyKind.voice else 200
        parameters = signature_headers(digest_required=True)
        if route.cacheable:
            parameters.append(
                header(
                    "X-Keyveil-Cache",
                    "1 opts in to the response cache for identical requests in a session",
                    schema={"type": "string", "enum": ["1"]},
                )
            )
        app.add_api_route(
            path,
            _served_by_the_handler,
            methods=["POST"],
            name=f"proxy_{route.endpoint}",
            summary=f"Forward to the provider's /{name} (scope {route.scope.value})",
            dependencies=[Depends(PROXY_TOKEN)],
            responses={
                ok: {
                    "description": "The provider's answer, streamed through"
                    if ok == 200
                    else "The session's id and SDP answer (Location names a call)",
                    "content": _ANSWERS[name],
                    "headers": _RATE_HEADERS,
                },
                **error_responses(400, 401, 403, 413, 415, 429, 502, 503, 504),
            },
            openapi_extra={
                "parameters": parameters,
                "requestBody": {
                    "required": True,
                    "content": {media: {"schema": _REQUEST_SCHEMAS[name]}},
                },
            },
        )
