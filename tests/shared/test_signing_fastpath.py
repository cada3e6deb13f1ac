"""The canonical-form fast path of shared.signing agrees with the full RFC 8941 parser."""

from __future__ import annotations

import time

import http_sf
from http_sf.innerlist import ser_innerlist
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.signing import (
    _fast_bytes,
    _fast_input,
    parse_content_digest,
    sign_request,
    verify_request,
)

_COMPONENTS = ["@method", "@path", "@authority", "content-digest", "content-type", "@query"]
_PIECES = st.sampled_from(
    [
        'sig1=("@method" "@path")',
        '("@method" "content-digest")',
        '("@method" "a)b")',
        '("x y" "@path")',
        ';keyid=")"',
        ";created=1700000000",
        ";created=007",
        ";created=-0",
        ";created=1.5",
        ';keyid="abc"',
        ';keyid="a\\"b"',
        ";alg=hmac-sha256",
        ';nonce="n0nce-value"',
        ";flag",
        ";created=1;created=2",
        " ",
        ", sig2=()",
        'sig2=("@method")',
        "=",
        '"',
        "sig1=()",
    ]
)


def _full(value: str) -> tuple[str, list[str], dict[str, object], str] | None:
    try:
        parsed = http_sf.parse(value.encode("latin-1"), tltype="dictionary")
    except (http_sf.StructuredFieldError, UnicodeEncodeError):
        return None
    assert isinstance(parsed, dict)
    if len(parsed) != 1:
        return None
    label, member = next(iter(parsed.items()))
    if not (isinstance(member, tuple) and isinstance(member[0], list)):
        return None
    names = [item[0] if isinstance(item, tuple) else item for item in member[0]]
    return label, names, dict(member[1]), ser_innerlist(member)


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, min_size=1, max_size=6))
def test_fast_input_is_none_or_equal_to_the_full_parse(pieces: list[str]) -> None:
    value = "".join(pieces)
    fast = _fast_input(value)
    if fast is not None:
        assert fast == _full(value)


@settings(max_examples=200, deadline=None)
@given(
    components=st.lists(st.sampled_from(_COMPONENTS), unique=True, max_size=6),
    nonce=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=8),
    created=st.integers(min_value=-(10**15) + 1, max_value=10**15 - 1),
)
def test_signer_output_takes_the_fast_path_exactly(
    components: list[str], nonce: str, created: int
) -> None:
    headers = sign_request(
        method="POST",
        path="/p",
        key=b"k" * 32,
        keyid="kid",
        body=b"{}",
        headers={"content-type": "application/json"},
        components=components,
        created=created,
        nonce=nonce,
    )
    value = headers["Signature-Input"]
    full = _full(value)
    fast = _fast_input(value)
    if '"' in nonce or "\\" in nonce:
        assert fast is None  # escapes always take the full parser
    else:
        assert fast is not None
        assert fast == full


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80), st.sampled_from(["sha-256", "sha-512", "sig1", "x"]))
def test_fast_bytes_matches_the_full_parse(raw: bytes, key: str) -> None:
    value = http_sf.ser({key: (raw, {})})
    fast = _fast_bytes(value)
    assert fast == (key, raw)
    broken = value.replace("=", "", 1) if "=" in value[len(key) + 1 :] else value + " "
    fast_broken = _fast_bytes(broken)
    if fast_broken is not None:
        parsed = http_sf.parse(broken.encode(), tltype="dictionary")
        assert isinstance(parsed, dict)
        member = parsed[fast_broken[0]]
        assert (member[0] if isinstance(member, tuple) else member) == fast_broken[1]


def test_non_canonical_digest_still_parses() -> None:
    value = "sha-256=:AAAA:, sha-512=:" + "B" * 88 + ":"
    assert parse_content_digest(value).alg == "sha-512"


def test_verify_accepts_both_paths_identically() -> None:
    key = b"s" * 32
    now = time.time()
    headers = {
        k.lower(): v
        for k, v in sign_request(
            method="POST", path="/p", key=key, keyid="kid", body=b"{}", created=int(now)
        ).items()
    }
    fast = verify_request(
        method="POST",
        path="/p",
        headers=headers,
        body=b"{}",
        key_for=lambda _: key,
        now=now,
        window_s=60,
    )
    # The same signature with harmless optional whitespace takes the full parser.
    spaced = {**headers, "signature-input": headers["signature-input"] + " "}
    full = verify_request(
        method="POST",
        path="/p",
        headers=spaced,
        body=b"{}",
        key_for=lambda _: key,
        now=now,
        window_s=60,
    )
    assert fast == full


def test_component_names_with_parentheses_or_spaces_are_read_whole() -> None:
    """The red-team finding: `"a)b"` was cut at its `)` and the rest read as parameters."""
    value = 'sig1=("@method" "a)b;created=1" "x y");created=1700000000;keyid="k"'
    fast = _fast_input(value)
    assert fast is not None
    assert fast == _full(value)
    assert fast[1] == ["@method", "a)b;created=1", "x y"]
    assert fast[2] == {"created": 1700000000, "keyid": "k"}
