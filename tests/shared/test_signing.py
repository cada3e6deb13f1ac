"""RFC 9421 signing and RFC 9530 digests: our code against itself and against the
independent `http-message-signatures` package, both directions."""

from __future__ import annotations

import base64
import datetime
import hashlib
import time
from dataclasses import dataclass, field

import pytest
from http_message_signatures import (
    HTTPMessageSigner,
    HTTPMessageVerifier,
    InvalidSignature,
    MappingKeyResolver,
    algorithms,
)
from http_message_signatures.structures import CaseInsensitiveDict

from shared.errors import ApiError, AuthError
from shared.signing import (
    DigestError,
    SignatureError,
    SignatureExpiredError,
    SignatureFormatError,
    content_digest,
    parse_content_digest,
    sign_request,
    verify_request,
)

KEY = b"k" * 32
KEYID = "tok-123"
PATH = "/api/voice-agent/proxy/v1/chat/completions"
BODY = b'{"model":"gpt-4o-mini","messages":[]}'


def key_for(keyid: str) -> bytes:
    if keyid != KEYID:
        raise AuthError("unknown key", code="signature_unknown_key")
    return KEY


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def verify(headers: dict[str, str], body: bytes | None = BODY, **kw: object) -> object:
    args: dict[str, object] = {
        "method": "POST",
        "path": PATH,
        "headers": lower(headers),
        "body": body,
        "key_for": key_for,
        "now": time.time(),
        "window_s": 60,
        "authority": "proxy.example.com",
    }
    args.update(kw)
    return verify_request(**args)  # type: ignore[arg-type]


def signed(**kw: object) -> dict[str, str]:
    args: dict[str, object] = {
        "method": "POST",
        "path": PATH,
        "body": BODY,
        "key": KEY,
        "keyid": KEYID,
        "authority": "proxy.example.com",
    }
    args.update(kw)
    return sign_request(**args)  # type: ignore[arg-type]


def test_content_digest_matches_rfc9530_example() -> None:
    # RFC 9530 appendix: {"hello": "world"}\n
    body = b'{"hello": "world"}\n'
    assert content_digest(body) == "sha-256=:RK/0qy18MlBSVnWgjwz6lZEWjP/lF5HF9bvEF8FabDg=:"
    assert content_digest(body, "sha-512").startswith("sha-512=:YMAam51Jz/jOATT6/zvHrLVgOYTGFy1d")


def test_round_trip_with_own_code() -> None:
    result = verify(signed(nonce="nonce-0001"))
    assert result.keyid == KEYID  # type: ignore[attr-defined]
    assert result.nonce == "nonce-0001"  # type: ignore[attr-defined]
    assert result.components == ("@method", "@path", "content-digest")  # type: ignore[attr-defined]


def test_signature_input_format() -> None:
    headers = signed(created=1_700_000_000, nonce="abcdefgh")
    assert headers["Signature-Input"] == (
        'sig1=("@method" "@path" "content-digest");created=1700000000;'
        'keyid="tok-123";alg="hmac-sha256";nonce="abcdefgh"'
    )
    assert headers["Signature"].startswith("sig1=:")
    assert headers["Signature"].endswith(":")


@pytest.mark.parametrize(
    ("change", "error", "code"),
    [
        ({"method": "PUT"}, SignatureError, "signature_invalid"),
        ({"path": PATH + "x"}, SignatureError, "signature_invalid"),
        ({"body": BODY + b" "}, DigestError, "digest_mismatch"),
    ],
)
def test_tampering_is_refused(change: dict[str, object], error: type, code: str) -> None:
    with pytest.raises(error) as caught:
        verify(signed(), **change)
    assert caught.value.code == code


def test_wrong_key_and_unknown_keyid() -> None:
    with pytest.raises(SignatureError, match="signature_invalid"):
        verify(signed(key=b"x" * 32))
    with pytest.raises(AuthError, match="signature_unknown_key"):
        verify(signed(keyid="someone-else"))


@pytest.mark.parametrize(("offset", "code"), [(-61, "signature_expired"), (61, "signature_future")])
def test_created_outside_window(offset: int, code: str) -> None:
    with pytest.raises(SignatureExpiredError) as caught:
        verify(signed(created=int(time.time()) + offset))
    assert caught.value.code == code


def test_created_inside_window_both_ways() -> None:
    verify(signed(created=int(time.time()) - 55))
    verify(signed(created=int(time.time()) + 55))


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda h: h.pop("Signature"), "signature_missing"),
        (lambda h: h.pop("Signature-Input"), "signature_missing"),
        (lambda h: h.update({"Signature-Input": 'sig1=("@method"'}), "signature_malformed"),
        (lambda h: h.update({"Signature": 'sig1="not-bytes"'}), "signature_malformed"),
        (lambda h: h.update({"Signature": "other=:AAAA:"}), "signature_malformed"),
        (lambda h: h.pop("Content-Digest"), "digest_missing"),
        (lambda h: h.update({"Content-Digest": content_digest(b"x")}), "signature_invalid"),
        (lambda h: h.update({"Signature-Input": "sig1=\u00e9"}), "signature_malformed"),
    ],
)
def test_malformed_headers(mutate: object, code: str) -> None:
    headers = signed()
    mutate(headers)  # type: ignore[operator]
    with pytest.raises(ApiError) as caught:
        verify(headers)
    assert caught.value.code == code
    assert caught.value.status in (400, 401)


def test_required_parameters() -> None:
    base = 'sig1=("@method" "@path" "content-digest")'
    for params, code in [
        (';keyid="tok-123";nonce="abcdefgh"', "signature_incomplete"),
        (';created=1;nonce="abcdefgh"', "signature_incomplete"),
        (f';created={int(time.time())};keyid="tok-123"', "signature_incomplete"),
        (f';created={int(time.time())};keyid="tok-123";nonce="short"', "signature_malformed"),
        (
            f';created={int(time.time())};keyid="tok-123";nonce="abcdefgh";alg="rsa-pss-sha512"',
            "signature_alg_unsupported",
        ),
        (f';created="{int(time.time())}";keyid="tok-123";nonce="abcdefgh"', "signature_malformed"),
    ]:
        headers = signed()
        headers["Signature-Input"] = base + params
        with pytest.raises(SignatureFormatError) as caught:
            verify(headers)
        assert caught.value.code == code, params


def test_body_needs_a_covered_digest() -> None:
    no_digest = signed(body=None)
    with pytest.raises(DigestError, match="digest_missing"):
        verify(no_digest, body=BODY)
    uncovered = signed(components=["@method", "@path"])
    with pytest.raises(SignatureFormatError, match="signature_incomplete"):
        verify(uncovered)
    # @path is required whatever the client chose.
    with pytest.raises(SignatureFormatError, match="signature_incomplete"):
        verify(signed(components=["@method", "content-digest"]))


def test_bodyless_request_and_streamed_digest() -> None:
    assert verify(signed(body=None), body=b"").digest is None  # type: ignore[attr-defined]
    headers = signed(body=BODY, digest_alg="sha-512")
    result = verify(headers, body=None, require_digest=True)
    expected = result.digest  # type: ignore[attr-defined]
    assert expected.alg == "sha-512"
    hasher = expected.new_hasher()
    hasher.update(BODY)
    expected.check(hasher.digest())
    with pytest.raises(DigestError, match="digest_mismatch"):
        expected.check(hashlib.sha512(b"other").digest())


def test_extra_components_are_verified() -> None:
    components = ["@method", "@path", "@authority", "@target-uri", "@query", "content-type"]
    headers = signed(
        components=[*components, "content-digest"],
        query="?a=1",
        headers={"Content-Type": "application/json"},
    )
    headers["Content-Type"] = "application/json"
    verify(headers, query="a=1")
    with pytest.raises(SignatureError):
        verify(headers, query="a=2")
    with pytest.raises(SignatureError):
        verify(headers, query="a=1", authority="evil.example.com")
    headers["Content-Type"] = "text/plain"
    with pytest.raises(SignatureError):
        verify(headers, query="a=1")


def test_injected_line_break_is_refused() -> None:
    headers = signed(
        components=["@method", "@path", "content-digest", "x-note"], headers={"x-note": "a"}
    )
    headers["x-note"] = "a\r\nX-Injected: 1"
    with pytest.raises(SignatureFormatError):
        verify(headers)


@pytest.mark.parametrize(
    ("digest", "code"),
    [
        ("sha-256=abc", "digest_malformed"),
        ("md5=:AAAA:", "digest_unsupported"),
        ("(", "digest_malformed"),
    ],
)
def test_signed_but_unusable_digest(digest: str, code: str) -> None:
    with pytest.raises(DigestError) as caught:
        verify(signed(headers={"content-digest": digest}))
    assert caught.value.code == code


def test_parse_content_digest_prefers_sha512() -> None:
    both = f"{content_digest(BODY)}, {content_digest(BODY, 'sha-512')}"
    assert parse_content_digest(both).alg == "sha-512"


# --- interop with the independent http-message-signatures implementation ------------


@dataclass
class Message:
    method: str
    url: str
    headers: CaseInsensitiveDict = field(default_factory=CaseInsensitiveDict)


def _resolver() -> MappingKeyResolver:
    return MappingKeyResolver(public_keys={KEYID: KEY}, private_keys={KEYID: KEY})


@pytest.mark.parametrize(
    "components",
    [
        ("@method", "@path", "content-digest"),
        ("@method", "@path", "@authority", "@target-uri", "content-digest", "content-type"),
    ],
)
def test_their_signature_verifies_with_ours(components: tuple[str, ...]) -> None:
    message = Message("POST", f"https://proxy.example.com{PATH}")
    message.headers["Content-Type"] = "application/json"
    signer = HTTPMessageSigner(signature_algorithm=algorithms.HMAC_SHA256, key_resolver=_resolver())
    signer.sign(
        message,
        key_id=KEYID,
        nonce="their-nonce-123",
        label="pyhms",
        covered_component_ids=components,
        body=BODY,
    )
    assert message.headers["Content-Digest"] == content_digest(BODY)
    result = verify(dict(message.headers.items()))
    assert result.label == "pyhms"  # type: ignore[attr-defined]
    assert result.nonce == "their-nonce-123"  # type: ignore[attr-defined]
    # And a tampered body fails our digest check though their signature is intact.
    with pytest.raises(DigestError):
        verify(dict(message.headers.items()), body=BODY + b"!")


def test_our_signature_verifies_with_theirs() -> None:
    headers = signed(
        components=["@method", "@path", "@authority", "content-digest"], nonce="our-nonce-1234"
    )
    message = Message("POST", f"https://proxy.example.com{PATH}")
    for name, value in headers.items():
        message.headers[name] = value
    verifier = HTTPMessageVerifier(
        signature_algorithm=algorithms.HMAC_SHA256, key_resolver=_resolver()
    )
    results = verifier.verify(message, max_age=datetime.timedelta(seconds=60), body=BODY)
    assert results[0].parameters["keyid"] == KEYID
    assert results[0].parameters["nonce"] == "our-nonce-1234"
    message.headers["Signature"] = "sig1=:" + base64.b64encode(b"\0" * 32).decode() + ":"
    with pytest.raises(InvalidSignature):
        verifier.verify(message, max_age=datetime.timedelta(seconds=60))
