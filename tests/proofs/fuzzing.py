"""What the fuzzing and bad-input proofs share: error-body rules and client plumbing."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import requests
from requests.adapters import HTTPAdapter

ERROR_CODE = re.compile(r"[a-z][a-z0-9_]*")
# Python leaking through: a traceback, a source path, an exception class name.
LEAK_MARKERS = re.compile(
    r"Traceback|File \"|site-packages|\.py\b|\b[A-Z][A-Za-z]*(?:Error|Exception)\b|<class "
)

# The stack runs with generous limits so the proofs fuzz the checks, not the limiter;
# each kind of client uses its own loopback address so that one kind's strikes and
# blocks (shared across services through Redis) cannot starve another.
STACK_ENV = {
    "VOICE_AGENT_RATE_LIMIT": "100000",
    "VOICE_AGENT_PROXY_RATE_LIMIT": "100000",
    "VOICE_AGENT_PROXY_IP_RATE_LIMIT": "1000000",
    "RATE_LIMIT_BLOCK_AFTER_STRIKES": "1000000",
    "KEYVEIL_POLICY_FILE": str(Path(__file__).with_name("any-model-policy.toml")),
}


def error_problems(status: int, content_type: str, body: bytes) -> list[str]:
    """Why an error response breaks the contract; [] when it keeps it.

    The contract: JSON `{"error": {"code": <snake_case>, "message": <str>}}`, and no
    stack trace or Python exception text anywhere in it.
    """
    if status < 400:
        return []
    problems: list[str] = []
    if not content_type.lower().startswith("application/json"):
        problems.append(f"{status} answered with content-type {content_type!r}, not JSON")
    text = body.decode("utf-8", "replace")
    if leak := LEAK_MARKERS.search(text):
        problems.append(f"{status} body shows Python internals ({leak.group(0)!r})")
    try:
        payload: Any = json.loads(body)
    except ValueError:
        return [*problems, f"{status} body is not JSON: {text[:200]!r}"]
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return [*problems, f"{status} body has no error object: {text[:200]!r}"]
    code, message = error.get("code"), error.get("message")
    if not isinstance(code, str) or not ERROR_CODE.fullmatch(code):
        problems.append(f"{status} error code {code!r} is not a stable snake_case code")
    if not isinstance(message, str) or not message:
        problems.append(f"{status} error message {message!r} is not a string")
    return problems


class SourceAddressAdapter(HTTPAdapter):
    """A `requests` adapter whose connections leave from one loopback address."""

    def __init__(self, address: str) -> None:
        self._address = address
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self._address, 0)
        super().init_poolmanager(*args, **kwargs)


def session_from(address: str) -> requests.Session:
    session = requests.Session()
    adapter = SourceAddressAdapter(address)
    session.mount("http://", adapter)
    return session


def httpx_client_from(address: str, timeout: float = 15) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=timeout)
