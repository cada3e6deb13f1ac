"""The committed OpenAPI specs are exactly what the apps generate, and say the contract."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from fastapi.testclient import TestClient

from keyveil.commands.openapi import SERVICES, build_app, spec, spec_json
from tests.support import REPO

SPEC_DIR = REPO / "docs" / "openapi"


@pytest.mark.parametrize("service", SERVICES)
def test_committed_spec_equals_the_generated_one(service: str) -> None:
    committed = (SPEC_DIR / f"{service}.json").read_text(encoding="utf-8")
    assert committed == spec_json(service), (
        f"docs/openapi/{service}.json is stale: run "
        f"`keyveil openapi {service} > docs/openapi/{service}.json`"
    )


@pytest.mark.parametrize("service", SERVICES)
def test_the_command_prints_the_spec(service: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "keyveil.cli", "openapi", service],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=REPO,
    )
    assert done.stdout == spec_json(service)


def test_an_unknown_service_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "keyveil.cli", "openapi", "keymanager"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 2
    assert "invalid choice" in done.stderr


def _operations(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        f"{method.upper()} {path}": operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }


def _header_names(operation: dict[str, Any]) -> dict[str, bool]:
    return {
        p["name"]: p["required"] for p in operation.get("parameters", []) if p["in"] == "header"
    }


def test_token_spec_describes_bodies_headers_and_errors() -> None:
    document = spec("token")
    operations = _operations(document)
    assert set(operations) == {
        "POST /api/voice-agent/secure-token",
        "POST /api/voice-agent/token",
        "DELETE /api/voice-agent/secure-token/{token_id}",
    }
    issue = operations["POST /api/voice-agent/secure-token"]
    body = issue["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["mode"]["enum"] == ["auto", "realtime", "proxy", "demo"]
    assert "$ref" not in json.dumps(body)  # inlined: no dangling $defs
    # Authorization carries the app's login (KEYVEIL_AUTH_MODE oidc/assertion), optional.
    assert _header_names(issue) == {"Origin": True, "Authorization": False}
    assert "401" in issue["responses"]
    assert operations["POST /api/voice-agent/token"]["deprecated"] is True
    revoke = operations["DELETE /api/voice-agent/secure-token/{token_id}"]
    assert revoke["security"] == [{"proxyToken": []}]
    assert _header_names(revoke) == {
        "Signature-Input": True,
        "Signature": True,
        "Content-Digest": False,
        "Origin": False,
    }
    for operation in operations.values():
        for status in ("400", "4XX", "5XX"):
            schema = operation["responses"][status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}
        assert "422" not in operation["responses"]


def test_proxy_spec_describes_every_allowlisted_path() -> None:
    document = spec("proxy")
    operations = _operations(document)
    assert set(operations) == {
        "POST /api/voice-agent/proxy/v1/chat/completions",
        "POST /api/voice-agent/proxy/v1/responses",
        "POST /api/voice-agent/proxy/v1/audio/speech",
        "POST /api/voice-agent/proxy/v1/audio/transcriptions",
        "POST /api/voice-agent/proxy/v1/live/sessions",
        "POST /api/voice-agent/proxy/v1/realtime/calls",
    }
    live = operations["POST /api/voice-agent/proxy/v1/live/sessions"]
    assert "201" in live["responses"]
    assert live["requestBody"]["content"]["application/json"]["schema"]["required"] == ["transport"]
    calls = operations["POST /api/voice-agent/proxy/v1/realtime/calls"]
    assert "application/sdp" in calls["responses"]["201"]["content"]
    for name, operation in operations.items():
        assert operation["security"] == [{"proxyToken": []}], name
        headers = _header_names(operation)
        assert headers["Signature-Input"] is True
        assert headers["Signature"] is True
        assert headers["Content-Digest"] is True
        assert headers["Origin"] is False
        assert {"401", "4XX", "5XX"} <= set(operation["responses"])
    upload = operations["POST /api/voice-agent/proxy/v1/audio/transcriptions"]["requestBody"]
    assert upload["content"]["multipart/form-data"]["schema"]["required"] == ["file", "model"]
    error = document["components"]["schemas"]["ErrorBody"]
    assert error["required"] == ["error"]
    detail = document["components"]["schemas"]["ErrorDetail"]
    assert set(detail["required"]) == {"code", "message"}
    assert detail["properties"]["code"]["pattern"] == "^[a-z][a-z0-9_]*$"


@pytest.mark.parametrize("service", SERVICES)
def test_the_services_still_serve_no_docs(service: str) -> None:
    client = TestClient(build_app(service))  # no lifespan: nothing is connected
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert client.get(path).status_code == 404, path
