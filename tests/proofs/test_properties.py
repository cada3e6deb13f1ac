"""Property tests: no forged or mutated input is ever accepted, and nothing but a typed
error comes out of the parsers, whatever the input."""

from __future__ import annotations

import time

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shared.errors import ApiError
from shared.ratelimit import Limit, LocalGcra
from shared.signing import content_digest, parse_content_digest, sign_request, verify_request
from shared.tokens import ProxyClaims, Scope, TokenKeyring

KEYRING = TokenKeyring("prop-test-signing-key-3k9Xq2Lm7Np4Rs8Tv1Wy6Zb")
OTHER = TokenKeyring("prop-test-other-signing-key-8Hj2Kl5Mn9Pq3Rs7Tv")
NOW = int(time.time())
CLAIMS = ProxyClaims(
    jti="tok-1", sid="ses-1", scopes=[Scope.chat], iat=NOW, exp=NOW + 600, origin="https://a.b"
)
TOKEN = KEYRING.issue(CLAIMS)
fast = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fast
@given(st.text(max_size=400))
@example("")
@example("a.b.c")
@example("eyJhbGciOiJub25lIn0.eyJqdGkiOiJ4In0.")  # alg=none
def test_arbitrary_text_is_never_a_token(text: str) -> None:
    try:
        KEYRING.verify(text)
    except ApiError as exc:
        assert exc.status == 401
    else:
        raise AssertionError("arbitrary text verified as a token")


@fast
@given(st.integers(min_value=0, max_value=len(TOKEN) - 1), st.characters(codec="ascii"))
def test_a_mutated_token_never_verifies_as_something_else(index: int, char: str) -> None:
    mutated = TOKEN[:index] + char + TOKEN[index + 1 :]
    try:
        claims = KEYRING.verify(mutated)
    except ApiError:
        return
    # Only a mutation that decodes to the very same bytes (base64 slack bits) may pass.
    assert claims == CLAIMS


@fast
@given(
    st.text(min_size=1, max_size=40),
    st.lists(st.sampled_from(list(Scope)), max_size=3),
    st.integers(min_value=1, max_value=10_000),
)
def test_tokens_from_another_signing_key_are_refused(
    jti: str, scopes: list[Scope], ttl: int
) -> None:
    forged = OTHER.issue(
        ProxyClaims(jti=jti, sid="s", scopes=scopes, iat=NOW, exp=NOW + ttl, origin=None)
    )
    try:
        KEYRING.verify(forged)
    except ApiError as exc:
        assert exc.code == "token_invalid"
    else:
        raise AssertionError("a token signed with another key verified")


SIGNING_KEY = b"k" * 32
BODY = b'{"model":"gpt-4o-mini","messages":[]}'
PATH = "/api/voice-agent/proxy/v1/chat/completions"


def _signed_headers() -> dict[str, str]:
    headers = sign_request(
        method="POST", path=PATH, key=SIGNING_KEY, keyid="tok-1", body=BODY, created=NOW
    )
    return {k.lower(): v for k, v in headers.items()}


def _verify(method: str, path: str, headers: dict[str, str], body: bytes) -> None:
    verify_request(
        method=method,
        path=path,
        headers=headers,
        body=body,
        key_for=lambda keyid: SIGNING_KEY,
        now=NOW,
        window_s=60,
    )


def test_the_unmutated_request_verifies() -> None:
    _verify("POST", PATH, _signed_headers(), BODY)


@fast
@given(st.binary(max_size=64))
def test_any_other_body_is_refused(body: bytes) -> None:
    if body == BODY:
        return
    try:
        _verify("POST", PATH, _signed_headers(), body)
    except ApiError as exc:
        assert 400 <= exc.status < 500
    else:
        raise AssertionError("a changed body verified")


@fast
@given(
    st.sampled_from(["signature", "signature-input", "content-digest"]),
    st.integers(min_value=0, max_value=200),
    st.characters(codec="ascii"),
)
def test_a_mutated_signature_header_is_refused(name: str, index: int, char: str) -> None:
    headers = _signed_headers()
    value = headers[name]
    index %= len(value)
    mutated = value[:index] + char + value[index + 1 :]
    if mutated == value:
        return
    headers[name] = mutated
    try:
        _verify("POST", PATH, headers, BODY)
    except ApiError as exc:
        assert 400 <= exc.status < 500
    # A mutation that only rewrites insignificant syntax (e.g. whitespace inside the
    # structured field) may still verify: the signed values are unchanged.


@fast
@given(st.sampled_from(["GET", "PUT", "DELETE", "post"]), st.text(max_size=60))
def test_other_methods_and_paths_are_refused(method: str, path: str) -> None:
    if method.upper() == "POST" and path == PATH:
        return
    try:
        _verify(method, path or "/", _signed_headers(), BODY)
    except ApiError as exc:
        assert 400 <= exc.status < 500
    else:
        if method.upper() != "POST" or (path or "/") != PATH:
            raise AssertionError(f"{method} {path!r} verified with a signature for POST {PATH}")


@fast
@given(
    st.dictionaries(
        st.sampled_from(["signature", "signature-input", "content-digest"]), st.text(max_size=200)
    )
)
def test_arbitrary_signature_headers_give_typed_errors(headers: dict[str, str]) -> None:
    try:
        _verify("POST", PATH, headers, BODY)
    except ApiError as exc:
        assert 400 <= exc.status < 500
    else:
        raise AssertionError("arbitrary headers verified")


@fast
@given(st.text(max_size=200))
def test_content_digest_parsing_gives_typed_errors(value: str) -> None:
    try:
        parsed = parse_content_digest(value)
    except ApiError as exc:
        assert exc.status == 400
    else:
        assert parsed.alg in ("sha-256", "sha-512")


@fast
@given(st.binary(max_size=256), st.binary(max_size=256), st.sampled_from(["sha-256", "sha-512"]))
def test_a_digest_matches_only_its_own_body(body: bytes, other: bytes, alg: str) -> None:
    expected = parse_content_digest(content_digest(body, alg))
    expected.check_body(body)
    if other != body:
        try:
            expected.check_body(other)
        except ApiError:
            return
        raise AssertionError("a digest matched another body")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@fast
@given(st.integers(min_value=1, max_value=50), st.integers(min_value=1, max_value=200))
def test_gcra_admits_exactly_the_burst_at_one_instant(limit: int, attempts: int) -> None:
    clock = Clock()
    gcra = LocalGcra(clock=clock)
    rule = Limit(layer="per-token", subject="t", limit=limit, period_s=60)
    allowed = sum(gcra.check([rule]).allowed for _ in range(attempts))
    assert allowed == min(limit, attempts)


@fast
@given(
    st.integers(min_value=1, max_value=20),
    st.floats(min_value=1, max_value=120),
    st.lists(st.floats(min_value=0, max_value=30), min_size=1, max_size=200),
)
def test_gcra_never_exceeds_limit_plus_refill(limit: int, period: float, gaps: list[float]) -> None:
    clock = Clock()
    gcra = LocalGcra(clock=clock)
    rule = Limit(layer="per-ip", subject="ip", limit=limit, period_s=period)
    start = clock.now
    allowed = 0
    for gap in gaps:
        clock.now += gap
        decision = gcra.check([rule])
        allowed += decision.allowed
        if not decision.allowed:
            assert decision.retry_after_s > 0
        assert 0 <= (decision.remaining or 0) <= limit
    elapsed = clock.now - start
    # GCRA: a burst of `limit`, then one request per period/limit.
    assert allowed <= limit + int(elapsed / (period / limit)) + 1


@fast
@given(st.integers(min_value=1, max_value=10), st.integers(min_value=11, max_value=30))
def test_layers_are_all_or_nothing(small: int, large: int) -> None:
    gcra = LocalGcra(clock=Clock())
    tight = Limit(layer="per-token", subject="t", limit=small, period_s=60)
    loose = Limit(layer="per-ip", subject="ip", limit=large, period_s=60)
    for _ in range(small):
        assert gcra.check([loose, tight]).allowed
    refused = gcra.check([loose, tight])
    assert not refused.allowed
    assert refused.layer == "per-token"
    # The refused request consumed nothing from the loose layer.
    alone = [gcra.check([loose]).allowed for _ in range(large)]
    assert sum(alone) == large - small
