"""Both edges answer the same condition with the same refusal (real processes).

The check "a signed request by a token holder" (`shared.guard.SignedRequestGuard`) runs
at the proxy (every proxied call) and at the token service (a holder revoking its
token). One case class, `SignedRequestCases`, runs against each edge: every case
expects one `shared.contract.Refusal`, so the two edges agree on code and status by
construction, and `test_the_edges_agree` compares what they actually answered.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from shared.contract import Refusal
from tests.proofs.fuzzing import STACK_ENV, httpx_client_from
from tests.proofs.test_bad_input import CHAT, GOOD_CHAT, TOKEN, Bench, signed
from tests.stack import ORIGIN, running_stack

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

_addresses = (f"127.0.2.{n}" for n in itertools.count(1))
STRIKES_TO_BLOCK = 3
# What each edge answered, by case name: filled by the case classes, compared at the end.
ANSWERS: dict[str, dict[str, tuple[int, str]]] = {}


@dataclass(frozen=True)
class Answer:
    status: int
    code: str
    headers: dict[str, str]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    env = {**STACK_ENV, "RATE_LIMIT_BLOCK_AFTER_STRIKES": str(STRIKES_TO_BLOCK)}
    with running_stack(tmp_path_factory.mktemp("edgecontract"), env=env) as stack:
        yield Bench(stack)


class SignedRequestCases:
    """Conditions of the signed-request check; a subclass says how to reach its edge."""

    edge: ClassVar[str]

    def send(
        self,
        bench: Bench,
        *,
        ip: str,
        token: dict[str, Any],
        headers: list[tuple[str, str | bytes]] | None = None,
        times: int = 1,
        content: bytes | None = None,
        **sign: Any,
    ) -> Answer:
        raise NotImplementedError

    def _expect(self, name: str, answer: Answer, refusal: Refusal) -> None:
        ANSWERS.setdefault(name, {})[self.edge] = (answer.status, answer.code)
        assert (answer.status, answer.code) == (refusal.status, refusal.value), answer

    def test_token_missing(self, bench: Bench) -> None:
        token = bench.issue()
        answer = self.send(bench, ip=next(_addresses), token=token, headers=[("Origin", ORIGIN)])
        self._expect("token missing", answer, Refusal.TOKEN_MISSING)

    def test_token_invalid(self, bench: Bench) -> None:
        token = bench.issue()
        answer = self.send(bench, ip=next(_addresses), token=token, bearer="not-a-token")
        self._expect("token invalid", answer, Refusal.TOKEN_INVALID)

    def test_signature_missing(self, bench: Bench) -> None:
        token = bench.issue()
        headers: list[tuple[str, str | bytes]] = [
            ("Authorization", f"Bearer {token['token']}"),
            ("Origin", ORIGIN),
        ]
        answer = self.send(bench, ip=next(_addresses), token=token, headers=headers)
        self._expect("signature missing", answer, Refusal.SIGNATURE_MISSING)

    def test_keyid_of_another_token(self, bench: Bench) -> None:
        token = bench.issue()
        other = bench.issue()
        answer = self.send(bench, ip=next(_addresses), token=token, keyid=other["token_id"])
        self._expect("keyid of another token", answer, Refusal.SIGNATURE_UNKNOWN_KEY)

    def test_wrong_signing_key(self, bench: Bench) -> None:
        token = bench.issue()
        answer = self.send(bench, ip=next(_addresses), token=token, key=secrets.token_bytes(32))
        self._expect("wrong signing key", answer, Refusal.SIGNATURE_INVALID)

    def test_signature_from_the_future(self, bench: Bench) -> None:
        token = bench.issue()
        answer = self.send(bench, ip=next(_addresses), token=token, created=2**33)
        self._expect("signature from the future", answer, Refusal.SIGNATURE_FUTURE)

    def test_body_without_digest(self, bench: Bench) -> None:
        token = bench.issue()
        answer = self.send(bench, ip=next(_addresses), token=token, body=None, content=b"{}")
        self._expect("body without digest", answer, Refusal.DIGEST_MISSING)

    def test_replay(self, bench: Bench) -> None:
        token = bench.issue()
        nonce = secrets.token_hex(8)
        answer = self.send(bench, ip=next(_addresses), token=token, nonce=nonce, times=2)
        self._expect("replay", answer, Refusal.REPLAY_DETECTED)

    def test_blocked_client(self, bench: Bench) -> None:
        ip = next(_addresses)
        for _ in range(STRIKES_TO_BLOCK):
            forged = self.send(bench, ip=ip, token=bench.issue(), bearer="forged")
            assert forged.code == Refusal.TOKEN_INVALID
        time.sleep(0.3)  # the proxy records a strike off the request path
        answer = self.send(bench, ip=ip, token=bench.issue())
        self._expect("blocked client", answer, Refusal.IP_BLOCKED)
        assert int(answer.headers["retry-after"]) >= 1


class TestProxyEdge(SignedRequestCases):
    edge = "proxy"

    def send(
        self,
        bench: Bench,
        *,
        ip: str,
        token: dict[str, Any],
        headers: list[tuple[str, str | bytes]] | None = None,
        times: int = 1,
        content: bytes | None = None,
        **sign: Any,
    ) -> Answer:
        wire = headers if headers is not None else signed(bench, token, **sign)
        body = GOOD_CHAT.encode() if content is None else content
        return _send(f"{bench.proxy_url}{CHAT}", "POST", wire, body, ip, times)


class TestRevocationEdge(SignedRequestCases):
    edge = "token"

    def send(
        self,
        bench: Bench,
        *,
        ip: str,
        token: dict[str, Any],
        headers: list[tuple[str, str | bytes]] | None = None,
        times: int = 1,
        content: bytes | None = None,
        **sign: Any,
    ) -> Answer:
        path = f"{TOKEN}/{token['token_id']}"
        wire = (
            headers
            if headers is not None
            else signed(bench, token, path=path, method="DELETE", **{"body": b"", **sign})
        )
        return _send(f"{bench.token_url}{path}", "DELETE", wire, content or b"", ip, times)


def _send(
    url: str,
    method: str,
    headers: list[tuple[str, str | bytes]],
    body: bytes,
    ip: str,
    times: int,
) -> Answer:
    wire = [
        (name.encode(), value if isinstance(value, bytes) else value.encode("latin-1"))
        for name, value in headers
    ]
    with httpx_client_from(ip) as client:
        for _ in range(times):
            answer = client.request(method, url, headers=wire, content=body)
    code = answer.json()["error"]["code"] if answer.status_code >= 400 else "ok"
    return Answer(answer.status_code, code, dict(answer.headers))


def test_the_edges_agree(bench: Bench) -> None:
    """Each condition answered alike on both edges (cases not run yet are run here)."""
    cases = [name for name in dir(SignedRequestCases) if name.startswith("test_")]
    for edge_class in (TestProxyEdge, TestRevocationEdge):
        for case in cases:
            label = case.removeprefix("test_").replace("_", " ")
            if edge_class.edge not in ANSWERS.get(label, {}):
                getattr(edge_class(), case)(bench)
    assert len(ANSWERS) == len(cases), ANSWERS
    for name, by_edge in ANSWERS.items():
        assert set(by_edge) == {"proxy", "token"}, name
        assert by_edge["proxy"] == by_edge["token"], (name, by_edge)


def test_a_preflight_for_another_method_is_refused(bench: Bench) -> None:
    with httpx_client_from(next(_addresses)) as client:
        answer = client.options(
            f"{bench.token_url}{TOKEN}",
            headers={"Origin": ORIGIN, "Access-Control-Request-Method": "PUT"},
        )
    refusal = Refusal.CORS_METHOD_FORBIDDEN
    assert (answer.status_code, answer.json()["error"]["code"]) == (refusal.status, refusal.value)
