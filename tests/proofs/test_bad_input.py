"""A table of known-bad requests against the running token and proxy services.

Each row must be refused with its 4xx and stable code as JSON `{"error": {"code",
"message"}}`, with no stack trace or Python internals, without echoing the
secret-looking marker it carries, and without the fake provider seeing any call.
Each row sends from its own loopback address, so one row's auth failures (which strike
and then block a client IP) cannot change the answer another row gets.

Requests that are not valid HTTP at all (a CR, LF or NUL inside a header value) never
reach the app: uvicorn's parser refuses them, and `shared.httpedge.run_service` makes
that refusal the same JSON error (`invalid_http`) as every other.
"""

from __future__ import annotations

import itertools
import json
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from shared.crypto import b64url_decode
from shared.signing import sign_request
from tests.proofs.fuzzing import STACK_ENV, error_problems, httpx_client_from
from tests.stack import ORIGIN, Stack, running_stack

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

MARK = f"sk-bad-input-{secrets.token_hex(12)}"  # secret-looking; must never come back
TOKEN = "/api/voice-agent/secure-token"
PROXY = "/api/voice-agent/proxy/v1"
CHAT = f"{PROXY}/chat/completions"
STT = f"{PROXY}/audio/transcriptions"
MAX_JSON = 4096
GOOD_CHAT = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
_addresses = (f"127.0.1.{n}" for n in itertools.count(1))


@dataclass
class Sent:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


@dataclass
class Bench:
    """The running stack, a few real tokens, and one fresh client per row."""

    stack: Stack
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def token_url(self) -> str:
        return self.stack.url("token")

    @property
    def proxy_url(self) -> str:
        return self.stack.url("proxy")

    @property
    def fake_url(self) -> str:
        return str(self.stack.info["fake_upstream_url"])

    def fake_calls(self) -> int:
        return len(httpx.get(f"{self.fake_url}/_fake/calls", timeout=10).json()["calls"])

    def issue(self, **body: Any) -> dict[str, Any]:
        with httpx_client_from("127.0.0.9") as client:
            answer = client.post(
                f"{self.token_url}{TOKEN}",
                json={"mode": "proxy", **body},
                headers={"Origin": ORIGIN},
            )
        assert answer.status_code == 200, answer.text
        token: dict[str, Any] = answer.json()
        return token

    def send(
        self,
        service: str,
        method: str,
        path: str,
        *,
        headers: list[tuple[str, str | bytes]] | None = None,
        content: bytes = b"",
        times: int = 1,
    ) -> Sent:
        base = self.token_url if service == "token" else self.proxy_url
        wire = [
            (name.encode(), value if isinstance(value, bytes) else value.encode("latin-1"))
            for name, value in headers or []
        ]
        with httpx_client_from(next(_addresses)) as client:
            for _ in range(times):
                answer = client.request(method, f"{base}{path}", headers=wire, content=content)
        return Sent(answer.status_code, dict(answer.headers), answer.content)

    def send_raw(self, service: str, head: bytes) -> Sent:
        """Bytes on the wire, for requests no HTTP client will build."""
        url = urlsplit(self.token_url if service == "token" else self.proxy_url)
        with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
            sock.sendall(head)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        status_line, _, rest = data.partition(b"\r\n")
        header_block, _, body = rest.partition(b"\r\n\r\n")
        headers = {}
        for line in header_block.split(b"\r\n"):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return Sent(int(status_line.split()[1]), headers, body)


def signed(
    bench: Bench,
    token: dict[str, Any],
    *,
    path: str = CHAT,
    body: bytes = GOOD_CHAT.encode(),
    content_type: str = "application/json",
    bearer: str | None = None,
    **sign: Any,
) -> list[tuple[str, str | bytes]]:
    """Headers of a correctly signed request; `sign` overrides parts of the signature."""
    key = sign.pop("key", b64url_decode(str(token["signing_key"])))
    out = sign_request(
        method=sign.pop("method", "POST"),
        path=path,
        key=key,
        keyid=sign.pop("keyid", str(token["token_id"])),
        body=body,
        authority=urlsplit(bench.proxy_url).netloc,
        **sign,
    )
    return [
        ("Authorization", f"Bearer {bearer or token['token']}"),
        ("Origin", ORIGIN),
        ("Content-Type", content_type),
        *out.items(),
    ]


def multipart(*parts: tuple[str, str | None, bytes], boundary: str = "b0undary") -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


MULTIPART = "multipart/form-data; boundary=b0undary"


@dataclass(frozen=True)
class Row:
    name: str
    status: int
    code: str
    send: Callable[[Bench], Sent]


def _token_rows() -> Iterator[Row]:
    origin: list[tuple[str, str | bytes]] = [
        ("Origin", ORIGIN),
        ("Content-Type", "application/json"),
    ]

    def post(body: bytes | str, headers: list[tuple[str, str | bytes]] | None = None) -> Any:
        raw = body.encode() if isinstance(body, str) else body
        sent = origin if headers is None else headers
        return lambda b: b.send("token", "POST", TOKEN, headers=sent, content=raw)

    yield Row("token malformed JSON", 400, "invalid_json", post('{"mode": "' + MARK))
    yield Row("token non-UTF-8 JSON", 400, "invalid_json", post(b'{"mode": "\xff\xfe"}'))
    yield Row("token deeply nested JSON", 400, "invalid_json", post("[" * 5000 + "]" * 5000))
    yield Row("token body not an object", 400, "invalid_body", post(json.dumps([MARK])))
    yield Row("token mode wrong type", 400, "unknown_mode", post('{"mode": 7}'))
    yield Row("token unknown mode", 400, "unknown_mode", post(json.dumps({"mode": MARK})))
    yield Row(
        "token session wrong type",
        400,
        "invalid_request",
        post(json.dumps({"mode": "proxy", "session": MARK})),
    )
    yield Row(
        "token scopes wrong type",
        400,
        "invalid_request",
        post(json.dumps({"mode": "proxy", "scopes": MARK})),
    )
    yield Row(
        "token unknown scope",
        400,
        "scope_not_allowed",
        post(json.dumps({"mode": "proxy", "scopes": [MARK]})),
    )
    yield Row("token demo mode when disabled", 400, "demo_disabled", post('{"mode": "demo"}'))
    yield Row(
        "token oversized body",
        413,
        "payload_too_large",
        post(json.dumps({"mode": "proxy", "pad": MARK * 1000})),
    )
    yield Row(
        "token without Origin",
        403,
        "origin_required",
        post('{"mode": "proxy"}', [("Content-Type", "application/json")]),
    )
    yield Row(
        "token foreign Origin",
        403,
        "origin_forbidden",
        post('{"mode": "proxy"}', [("Origin", f"https://{MARK}.example")]),
    )
    yield Row(
        "token unknown path",
        404,
        "not_found",
        lambda b: b.send("token", "POST", f"{TOKEN}s/{MARK}", headers=origin),
    )
    yield Row(
        "token wrong method",
        405,
        "method_not_allowed",
        lambda b: b.send("token", "GET", TOKEN, headers=origin),
    )
    yield Row(
        "revoke with a garbage token",
        401,
        "token_invalid",
        lambda b: b.send(
            "token", "DELETE", f"{TOKEN}/x", headers=[("Authorization", f"Bearer {MARK}")]
        ),
    )

    def revoke(bench: Bench, build: Any = None, **kw: Any) -> Sent:
        token = bench.issue()
        path = f"{TOKEN}/{token['token_id']}"
        times = kw.pop("times", 1)
        headers = (
            build(token)
            if build is not None
            else signed(bench, token, path=path, body=b"", method="DELETE", **kw)
        )
        return bench.send("token", "DELETE", path, headers=headers, times=times)

    yield Row(
        "revoke with duplicate Authorization",
        401,
        "token_invalid",
        lambda b: revoke(
            b,
            lambda t: [
                ("Authorization", f"Bearer {t['token']}"),
                ("Authorization", f"Bearer {MARK}"),
            ],
        ),
    )
    yield Row(
        "revoke without Signature-Input",
        401,
        "signature_missing",
        lambda b: revoke(b, lambda t: [("Authorization", f"Bearer {t['token']}")]),
    )
    yield Row(
        "revoke with the token of another path",
        403,
        "token_mismatch",
        lambda b: b.send(
            "token",
            "DELETE",
            f"{TOKEN}/{MARK}",
            headers=[("Authorization", f"Bearer {b.issue()['token']}")],
        ),
    )
    yield Row(
        "revoke with a future created", 401, "signature_future", lambda b: revoke(b, created=2**33)
    )
    yield Row(
        "revoke replaying a nonce", 401, "replay_detected", lambda b: revoke(b, nonce=MARK, times=2)
    )


def _proxy_rows() -> Iterator[Row]:
    def call(
        path: str = CHAT,
        *,
        method: str = "POST",
        body: bytes = GOOD_CHAT.encode(),
        content_type: str = "application/json",
        build: Callable[[Bench, dict[str, Any]], list[tuple[str, str | bytes]]] | None = None,
        times: int = 1,
        scopes: list[str] | None = None,
        **sign: Any,
    ) -> Callable[[Bench], Sent]:
        def run(bench: Bench) -> Sent:
            token = bench.issue(scopes=scopes) if scopes else bench.tokens["proxy"]
            sent_headers = (
                build(bench, token)
                if build is not None
                else signed(bench, token, path=path, body=body, content_type=content_type, **sign)
            )
            return bench.send(
                "proxy", method, path, headers=sent_headers, content=body, times=times
            )

        return run

    def replace(name: str, value: str | bytes) -> Any:
        def headers(bench: Bench, token: dict[str, Any]) -> list[tuple[str, str | bytes]]:
            kept = [(k, v) for k, v in signed(bench, token) if k.lower() != name.lower()]
            return [*kept, (name, value)]

        return headers

    def drop(*names: str) -> Any:
        def headers(bench: Bench, token: dict[str, Any]) -> list[tuple[str, str | bytes]]:
            lowered = {n.lower() for n in names}
            return [(k, v) for k, v in signed(bench, token) if k.lower() not in lowered]

        return headers

    def duplicate_authorization(bench: Bench, token: dict[str, Any]) -> Any:
        return [*signed(bench, token), ("Authorization", f"Bearer {MARK}")]

    other_key = secrets.token_bytes(32)
    yield Row(
        "proxy without Authorization", 401, "token_missing", call(build=drop("authorization"))
    )
    yield Row(
        "proxy garbage token",
        401,
        "token_invalid",
        call(build=replace("Authorization", f"Bearer {MARK}")),
    )
    yield Row(
        "proxy duplicate Authorization",
        401,
        "token_invalid",
        call(build=duplicate_authorization),
    )
    yield Row(
        "proxy without Signature-Input",
        401,
        "signature_missing",
        call(build=drop("signature-input")),
    )
    yield Row(
        "proxy garbled Signature-Input",
        400,
        "signature_malformed",
        call(build=replace("Signature-Input", f'sig1=("@method" {MARK}')),
    )
    yield Row(
        "proxy non-Latin-1 Signature-Input",
        400,
        "signature_malformed",
        call(build=replace("Signature-Input", "sig1=\u00ff\u00fe".encode() + MARK.encode())),
    )
    yield Row(
        "proxy Signature label not in Signature-Input",
        400,
        "signature_malformed",
        call(build=replace("Signature", f"sig2=:{MARK}=:")),
    )
    yield Row(
        "proxy unsupported signature alg",
        400,
        "signature_alg_unsupported",
        call(build=replace("Signature-Input", 'sig1=("@method");created=1;keyid="k";alg="rsa"')),
    )
    yield Row(
        "proxy future created", 401, "signature_future", call(created=int(time.time()) + 3600)
    )
    yield Row("proxy stale created", 401, "signature_expired", call(created=1_000_000_000))
    yield Row("proxy unknown keyid", 401, "signature_unknown_key", call(keyid=MARK))
    yield Row("proxy wrong signing key", 401, "signature_invalid", call(key=other_key))
    yield Row(
        "proxy signature for another path",
        401,
        "signature_invalid",
        call(build=lambda b, t: signed(b, t, path=f"{PROXY}/audio/speech")),
    )
    yield Row(
        "proxy digest not covered",
        400,
        "signature_incomplete",
        call(components=["@method", "@path"]),
    )
    yield Row(
        "proxy wrong digest",
        400,
        "digest_mismatch",
        call(build=lambda b, t: signed(b, t, body=MARK.encode())),
    )
    yield Row(
        "proxy malformed digest",
        400,
        "digest_malformed",
        call(headers={"content-digest": f"sha-256={MARK}"}),
    )
    yield Row(
        "proxy unsupported digest",
        400,
        "digest_unsupported",
        call(headers={"content-digest": "md5=:AAAA:"}),
    )
    yield Row(
        "proxy duplicate nonce",
        401,
        "replay_detected",
        # The first send passes every signature check (then fails its digest), the
        # second repeats its nonce.
        call(build=lambda b, t: signed(b, t, body=MARK.encode(), nonce=MARK), times=2),
    )
    yield Row(
        "proxy malformed JSON", 400, "invalid_json", call(body=f'{{"model": "{MARK}'.encode())
    )
    yield Row(
        "proxy JSON not an object", 400, "invalid_json", call(body=json.dumps([MARK]).encode())
    )
    yield Row(
        "proxy wrong Content-Type",
        415,
        "unsupported_media_type",
        call(content_type="text/plain"),
    )
    yield Row(
        "proxy oversized JSON body",
        413,
        "payload_too_large",
        call(body=json.dumps({"model": MARK, "pad": "x" * MAX_JSON}).encode()),
    )
    yield Row(
        "proxy invalid multipart",
        400,
        "invalid_multipart",
        call(
            STT,
            body=b"--b0undary\r\n" + MARK.encode() + b"\r\n\r\n\x00--b0undary\r",
            content_type=MULTIPART,
        ),
    )
    yield Row(
        "proxy multipart without a boundary",
        415,
        "unsupported_media_type",
        call(
            STT, body=multipart(("model", None, b"whisper-1")), content_type="multipart/form-data"
        ),
    )
    yield Row(
        "proxy multipart without a file",
        400,
        "file_missing",
        call(STT, body=multipart(("model", None, MARK.encode())), content_type=MULTIPART),
    )
    yield Row(
        "proxy multipart without a model",
        400,
        "model_missing",
        call(STT, body=multipart(("file", "a.wav", MARK.encode())), content_type=MULTIPART),
    )
    yield Row(
        "proxy scope not granted",
        403,
        "scope_denied",
        call(f"{PROXY}/audio/speech", scopes=["chat/completions"]),
    )
    yield Row(
        "proxy foreign Origin",
        403,
        "origin_mismatch",
        call(build=replace("Origin", f"https://{MARK}.example")),
    )
    yield Row("proxy unknown endpoint", 404, "not_found", call(f"{PROXY}/models/{MARK}"))
    yield Row("proxy dot-dot path", 404, "not_found", call(f"{PROXY}/chat/completions/%2e%2e/x"))
    yield Row("proxy outside the prefix", 404, "not_found", call(f"/api/{MARK}"))
    yield Row("proxy wrong method", 405, "method_not_allowed", call(method="PUT"))


def _raw_rows() -> Iterator[Row]:
    def raw(service: str, header_line: bytes) -> Callable[[Bench], Sent]:
        path = TOKEN if service == "token" else CHAT

        def run(bench: Bench) -> Sent:
            return bench.send_raw(
                service,
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
                + header_line
                + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
            )

        return run

    for service in ("token", "proxy"):
        mark = MARK.encode()
        yield Row(
            f"{service} CR in a header value",
            400,
            "invalid_http",
            raw(service, b"Origin: " + mark + b"\rX-Injected: 1"),
        )
        yield Row(
            f"{service} LF in a header value",
            400,
            "invalid_http",
            raw(service, b"Authorization: Bearer " + mark + b"\nX-Injected: 1"),
        )
        yield Row(
            f"{service} NUL in a header value",
            400,
            "invalid_http",
            raw(service, b"Authorization: Bearer \x00" + mark),
        )


ROWS = [*_token_rows(), *_proxy_rows(), *_raw_rows()]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    env = {**STACK_ENV, "PROXY_MAX_JSON_BYTES": str(MAX_JSON)}
    with running_stack(tmp_path_factory.mktemp("badinput"), env=env) as stack:
        bench = Bench(stack)
        bench.tokens["proxy"] = bench.issue()
        logged = {name: len(stack.log(name)) for name in ("token", "proxy")}
        yield bench
        for name, start in logged.items():
            log = stack.log(name)[start:]
            assert "Traceback" not in log, f"{name} logged a traceback:\n{log[-3000:]}"
            assert MARK not in log, f"{name} logged the secret-looking input"


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_request_is_refused_cleanly(bench: Bench, row: Row) -> None:
    calls_before = bench.fake_calls()
    sent = row.send(bench)
    assert bench.fake_calls() == calls_before, "the provider saw a bad request"
    echoed = MARK.encode() in sent.body or any(MARK in v for v in sent.headers.values())
    assert not echoed, f"the answer echoes the input: {sent.body[:300]!r}"
    assert sent.status == row.status, (sent.status, sent.body[:300])
    assert error_problems(sent.status, sent.content_type, sent.body) == []
    assert json.loads(sent.body)["error"]["code"] == row.code, sent.body[:300]


def test_a_good_request_still_goes_through(bench: Bench) -> None:
    """The control: the same plumbing with nothing wrong reaches the provider once."""
    calls_before = bench.fake_calls()
    sent = bench.send(
        "proxy",
        "POST",
        CHAT,
        headers=signed(bench, bench.tokens["proxy"]),
        content=GOOD_CHAT.encode(),
    )
    assert sent.status == 200, sent.body[:300]
    assert bench.fake_calls() == calls_before + 1
