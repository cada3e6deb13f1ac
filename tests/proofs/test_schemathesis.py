"""schemathesis against the running token and proxy processes, driven by their specs.

The whole system runs (`keyveil up --fake-upstream`: real NATS, Redis, key manager).
Each generated request (positive and negative data) must get no 5xx, an answer that
conforms to the spec where the spec declares it, and, for every error, the JSON error
body with a stable snake_case code and no Python internals. Two thirds of the requests
go out as generated (unsigned, random credentials: the services must refuse them with a
4xx); the other third are made valid where credentials matter, so the deeper checks are
fuzzed too: the token endpoints get the allowed Origin, revocations and proxy calls
are signed with a real proxy token (`tests.stack.signed_headers`) over the exact
bytes schemathesis sends, which puts digests, JSON and multipart parsing under fuzz.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import schemathesis
from requests.auth import AuthBase
from schemathesis import Case as GenericCase
from schemathesis import GenerationMode
from schemathesis.checks import CheckContext, not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.transport import Response
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.proofs.fuzzing import (
    STACK_ENV,
    error_problems,
    httpx_client_from,
    session_from,
)
from tests.stack import ORIGIN, Stack, running_stack, signed_headers
from tests.support import REPO

Case = GenericCase[Any]

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SPECS = REPO / "docs" / "openapi"
MAX_EXAMPLES = 100  # per operation; the whole file takes about 30 s here (budget: 90 s)
CONFIG = SchemathesisConfig.from_dict(
    {
        "seed": 9421,  # reproducible runs; change it to explore further
        "request-timeout": 15,
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "database": "none"},
        "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
    }
)
TOKEN_API = schemathesis.openapi.from_path(SPECS / "token.json", config=CONFIG)
PROXY_API = schemathesis.openapi.from_path(SPECS / "proxy.json", config=CONFIG)

# Separate loopback clients (see tests.proofs.fuzzing.STACK_ENV).
TOKEN_FUZZ_ADDRESS = "127.0.0.2"
PROXY_UNSIGNED_ADDRESS = "127.0.0.3"
PROXY_SIGNED_ADDRESS = "127.0.0.4"
ISSUER_ADDRESS = "127.0.0.5"
_turns = itertools.count()


def error_body_contract(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Every 4xx/5xx is `{"error": {"code": <snake_case>, "message"}}`, no internals."""
    content_type = (response.headers.get("content-type") or [""])[0]
    problems = error_problems(response.status_code, content_type, response.content)
    if problems:
        raise AssertionError("; ".join(problems))
    return None


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    error_body_contract,
]


class SignWithToken(AuthBase):
    """Signs the prepared request (exact body bytes) as the browser SDK would."""

    def __init__(self, token: dict[str, Any]) -> None:
        self.token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        body = request.body
        if isinstance(body, str):
            body = body.encode("utf-8")
            request.body = body
            request.prepare_content_length(body)
        if not isinstance(body, bytes):
            body = b""
        url = urlsplit(request.url or "")
        headers = signed_headers(
            self.token,
            method=request.method or "POST",
            path=url.path,
            body=body,
            authority=url.netloc,
            content_type=None,
        )
        request.headers.update(headers)
        return request


class Fuzzing:
    """The running stack and one client per loopback address."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.token_url = stack.url("token")
        self.proxy_url = stack.url("proxy")
        self.token_session = session_from(TOKEN_FUZZ_ADDRESS)
        self.unsigned_session = session_from(PROXY_UNSIGNED_ADDRESS)
        self.signed_session = session_from(PROXY_SIGNED_ADDRESS)
        self.issuer = httpx_client_from(ISSUER_ADDRESS)
        self.proxy_token = self.issue()
        self.signed = {"token": 0, "proxy": 0}
        self.statuses: dict[str, set[int]] = {}

    def issue(self) -> dict[str, Any]:
        answer = self.issuer.post(
            f"{self.token_url}/api/voice-agent/secure-token",
            json={"mode": "proxy"},
            headers={"Origin": ORIGIN},
        )
        assert answer.status_code == 200, answer.text
        token: dict[str, Any] = answer.json()
        return token

    def record(self, case: Case, status: int) -> None:
        self.statuses.setdefault(case.operation.label, set()).add(status)

    def close(self) -> None:
        for session in (self.token_session, self.unsigned_session, self.signed_session):
            session.close()
        self.issuer.close()


@pytest.fixture(scope="module")
def fuzzing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzing]:
    with running_stack(tmp_path_factory.mktemp("fuzz"), env=STACK_ENV) as stack:
        state = Fuzzing(stack)
        logged = {name: len(stack.log(name)) for name in ("token", "proxy")}
        try:
            yield state
        finally:
            state.close()
        # Whatever the fuzzer sent, no service logged an unhandled exception.
        for name, start in logged.items():
            log = stack.log(name)[start:]
            assert "Traceback" not in log, f"{name} logged a traceback:\n{log[-3000:]}"


def _make_valid(case: Case) -> bool:
    """Whether this case gets valid credentials: one in three, so most go out as generated."""
    return next(_turns) % 3 == 0


@TOKEN_API.parametrize()
def test_token_api(case: Case, fuzzing: Fuzzing) -> None:
    kwargs: dict[str, Any] = {}
    if _make_valid(case):
        if case.method == "DELETE":
            # Revoke a real, freshly issued token, signed by its holder.
            fresh = fuzzing.issue()
            case.path_parameters = {**(case.path_parameters or {}), "token_id": fresh["token_id"]}
            kwargs["auth"] = SignWithToken(fresh)
        else:
            kwargs["headers"] = {"Origin": ORIGIN}
        fuzzing.signed["token"] += 1
    response = case.call(base_url=fuzzing.token_url, session=fuzzing.token_session, **kwargs)
    fuzzing.record(case, response.status_code)
    case.validate_response(response, checks=CHECKS)


@PROXY_API.parametrize()
def test_proxy_api(case: Case, fuzzing: Fuzzing) -> None:
    generation = case.meta.generation.mode if case.meta else GenerationMode.POSITIVE
    # A signed negative chat body that is still a JSON object goes to the provider, and
    # the fake provider is no validator of odd chat fields: that would fuzz the fake.
    goes_to_fake_unchecked = (
        generation is GenerationMode.NEGATIVE
        and case.operation.path.endswith("chat/completions")
        and isinstance(case.body, dict)
    )
    if _make_valid(case) and not goes_to_fake_unchecked:
        fuzzing.signed["proxy"] += 1
        response = case.call(
            base_url=fuzzing.proxy_url,
            session=fuzzing.signed_session,
            auth=SignWithToken(fuzzing.proxy_token),
        )
    else:
        response = case.call(base_url=fuzzing.proxy_url, session=fuzzing.unsigned_session)
        # Unsigned (random or no credentials): always refused, never forwarded.
        assert 400 <= response.status_code < 500, response.text[:300]
    fuzzing.record(case, response.status_code)
    case.validate_response(response, checks=CHECKS)


def test_the_fuzzing_reached_past_the_checks(fuzzing: Fuzzing) -> None:
    """Runs last: the signed share got real answers, not only refusals."""
    assert fuzzing.signed["proxy"] > 0
    assert fuzzing.signed["token"] > 0
    reached = {label for label, statuses in fuzzing.statuses.items() if 200 in statuses}
    assert "POST /api/voice-agent/secure-token" in reached
    assert "DELETE /api/voice-agent/secure-token/{token_id}" in reached
    for endpoint in ("chat/completions", "audio/speech", "audio/transcriptions"):
        assert f"POST /api/voice-agent/proxy/v1/{endpoint}" in reached, fuzzing.statuses
