"""HTTP Message Signatures (RFC 9421, hmac-sha256) and Content-Digest (RFC 9530).

Both sides live here: `sign_request` for clients and tests, `verify_request` for the
proxy (and for the token service's signed revocations). Signature-Input, Signature and
Content-Digest are Structured Fields (RFC 8941) and are parsed with `http_sf`, never
split by hand. Freshness of `created` is checked here; nonce uniqueness needs shared
state (Redis) and is the caller's job, using `VerifiedSignature.nonce`.

Errors (all `ApiError`s, each with a stable code and a `reason` for metrics):

    SignatureError (AuthError, 401)          reason "signature"
    ├── signature_missing / signature_invalid / signature_unknown_key
    └── SignatureExpiredError                reason "expired"
        └── signature_expired / signature_future
    SignatureFormatError (BadRequestError, 400)   reason "signature"
        signature_malformed / signature_incomplete / signature_alg_unsupported
    DigestError (BadRequestError, 400)       reason "digest"
        digest_missing / digest_malformed / digest_unsupported / digest_mismatch
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import http_sf
from http_sf.innerlist import ser_innerlist

from shared.errors import AuthError, BadRequestError

__all__ = [
    "ALGORITHM",
    "DEFAULT_LABEL",
    "DigestError",
    "ExpectedDigest",
    "Hasher",
    "SignatureError",
    "SignatureExpiredError",
    "SignatureFormatError",
    "VerifiedSignature",
    "content_digest",
    "parse_content_digest",
    "sign_request",
    "verify_request",
]

ALGORITHM = "hmac-sha256"
DEFAULT_LABEL = "sig1"
_DIGESTS: dict[str, Callable[[], Hasher]] = {
    "sha-256": hashlib.sha256,
    "sha-512": hashlib.sha512,
}
# Prefer the stronger digest when a client sends both.
_DIGEST_PREFERENCE = ("sha-512", "sha-256")
_DERIVED = frozenset(
    {"@method", "@path", "@query", "@authority", "@target-uri", "@scheme", "@request-target"}
)
_MAX_NONCE = 128
_MAX_COMPONENTS = 32


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...


class SignatureError(AuthError):
    """The request signature is missing or does not verify."""

    default_code = "signature_invalid"
    reason = "signature"


class SignatureExpiredError(SignatureError):
    """`created` is outside the freshness window, or `expires` has passed."""

    default_code = "signature_expired"
    reason = "expired"


class SignatureFormatError(BadRequestError):
    """Signature-Input / Signature cannot be parsed or break the contract."""

    default_code = "signature_malformed"
    reason = "signature"


class DigestError(BadRequestError):
    """Content-Digest is missing, unparseable or does not match the body."""

    default_code = "digest_mismatch"
    reason = "digest"


@dataclass(frozen=True)
class ExpectedDigest:
    """The digest a client declared for its body (the strongest supported one)."""

    alg: str
    value: bytes

    def new_hasher(self) -> Hasher:
        return _DIGESTS[self.alg]()

    def check(self, actual: bytes) -> None:
        """Raise `DigestError` unless `actual` (a raw digest) matches, in constant time."""
        if not hmac.compare_digest(self.value, actual):
            raise DigestError("Content-Digest does not match the body", code="digest_mismatch")

    def check_body(self, body: bytes) -> None:
        hasher = self.new_hasher()
        hasher.update(body)
        self.check(hasher.digest())


@dataclass(frozen=True)
class VerifiedSignature:
    label: str
    keyid: str
    nonce: str
    created: int
    components: tuple[str, ...]
    digest: ExpectedDigest | None
    """The declared body digest when the caller passed no body (it must check it itself)."""


def content_digest(body: bytes, alg: str = "sha-256") -> str:
    """`Content-Digest` value for `body`, e.g. `sha-256=:<base64>:`."""
    if alg not in _DIGESTS:
        raise ValueError(f"unsupported digest algorithm {alg!r}")
    hasher = _DIGESTS[alg]()
    hasher.update(body)
    return f"{alg}=:{base64.b64encode(hasher.digest()).decode()}:"


def parse_content_digest(value: str) -> ExpectedDigest:
    """The strongest supported digest in a Content-Digest field; `DigestError` otherwise."""
    fast = _fast_bytes(value)
    if fast is not None and fast[0] in _DIGESTS:
        return ExpectedDigest(fast[0], fast[1])
    try:
        parsed = http_sf.parse(value.encode("latin-1"), tltype="dictionary")
    except (http_sf.StructuredFieldError, UnicodeEncodeError):
        raise DigestError(
            "Content-Digest is not a valid dictionary", code="digest_malformed"
        ) from None
    assert isinstance(parsed, dict)
    for alg in _DIGEST_PREFERENCE:
        member = parsed.get(alg)
        if member is None:
            continue
        raw = member[0] if isinstance(member, tuple) else member
        if not isinstance(raw, bytes):
            raise DigestError(
                "Content-Digest value must be a byte sequence", code="digest_malformed"
            )
        return ExpectedDigest(alg, raw)
    raise DigestError("Content-Digest has no sha-256 or sha-512 value", code="digest_unsupported")


def _derived_values(
    *, method: str, path: str, query: str, authority: str, scheme: str
) -> dict[str, str]:
    query_part = query.removeprefix("?")
    target_path = path or "/"
    suffix = f"?{query_part}" if query_part else ""
    return {
        "@method": method.upper(),
        "@path": target_path,
        "@query": f"?{query_part}",
        "@authority": authority.lower(),
        "@scheme": scheme.lower(),
        "@target-uri": f"{scheme.lower()}://{authority.lower()}{target_path}{suffix}",
        "@request-target": f"{target_path}{suffix}",
    }


def _signature_base(
    components: Sequence[str],
    params_inner_list: str,
    resolve: Callable[[str], str],
) -> bytes:
    lines = []
    for name in components:
        value = resolve(name)
        if "\n" in value or "\r" in value:
            raise SignatureFormatError(f"component {name} contains a line break")
        lines.append(f'"{name}": {value}')
    lines.append(f'"@signature-params": {params_inner_list}')
    base = "\n".join(lines)
    if not base.isascii():
        raise SignatureFormatError("signature base contains non-ASCII characters")
    return base.encode("ascii")


def _field_value(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if value is None:
        raise SignatureFormatError(
            f"covered field {name} is not in the request", code="signature_incomplete"
        )
    return value.strip()


def sign_request(
    *,
    method: str,
    path: str,
    key: bytes,
    keyid: str,
    body: bytes | None = None,
    authority: str = "",
    query: str = "",
    scheme: str = "https",
    headers: Mapping[str, str] | None = None,
    created: int | None = None,
    nonce: str | None = None,
    components: Iterable[str] | None = None,
    label: str = DEFAULT_LABEL,
    digest_alg: str = "sha-256",
) -> dict[str, str]:
    """Headers to add to a request: Content-Digest (with a body), Signature-Input, Signature.

    By default covers `@method`, `@path` and, with a body, `content-digest`. Header
    components are read from `headers` (lower-case names).
    """
    covered = list(components) if components is not None else ["@method", "@path"]
    out: dict[str, str] = {}
    fields = {k.lower(): v for k, v in (headers or {}).items()}
    if body is not None:
        out["Content-Digest"] = fields.get("content-digest") or content_digest(body, digest_alg)
        fields["content-digest"] = out["Content-Digest"]
        if components is None:
            covered.append("content-digest")
    params: dict[str, Any] = {
        "created": int(time.time()) if created is None else created,
        "keyid": keyid,
        "alg": ALGORITHM,
        "nonce": nonce if nonce is not None else secrets.token_urlsafe(16),
    }
    inner = ser_innerlist(([(c, {}) for c in covered], params))
    derived = _derived_values(
        method=method, path=path, query=query, authority=authority, scheme=scheme
    )

    def resolve(name: str) -> str:
        return derived[name] if name.startswith("@") else _field_value(fields, name)

    base = _signature_base(covered, inner, resolve)
    mac = hmac.new(key, base, hashlib.sha256).digest()
    out["Signature-Input"] = f"{label}={inner}"
    out["Signature"] = http_sf.ser({label: (mac, {})})
    return out


def _parse_dict(value: str, name: str) -> dict[str, Any]:
    def refuse_duplicate(key: str, context: str) -> None:
        raise SignatureFormatError(f"{name} repeats {context} key")

    try:
        parsed = http_sf.parse(
            value.encode("latin-1"), tltype="dictionary", on_duplicate_key=refuse_duplicate
        )
    except (http_sf.StructuredFieldError, UnicodeEncodeError):
        raise SignatureFormatError(f"{name} is not a valid structured dictionary") from None
    assert isinstance(parsed, dict)
    return parsed


def _components_of(member: Any) -> tuple[list[str], dict[str, Any]]:
    if not (isinstance(member, tuple) and isinstance(member[0], list)):
        raise SignatureFormatError("Signature-Input member must be an inner list")
    items, params = member
    if len(items) > _MAX_COMPONENTS:
        raise SignatureFormatError("too many covered components")
    names: list[str] = []
    for item in items:
        value, item_params = item if isinstance(item, tuple) else (item, {})
        if not isinstance(value, str) or item_params:
            raise SignatureFormatError(
                "covered components must be plain strings without parameters"
            )
        names.append(value)
    return _check_components(names), params


def _check_components(names: list[str]) -> list[str]:
    if len(names) > _MAX_COMPONENTS:
        raise SignatureFormatError("too many covered components")
    seen: set[str] = set()
    for value in names:
        if value != value.lower() or (value.startswith("@") and value not in _DERIVED):
            raise SignatureFormatError("unsupported covered component")
        if value in seen:
            raise SignatureFormatError("a covered component appears twice")
        seen.add(value)
    return names


def _param(params: Mapping[str, Any], name: str, kind: type) -> Any:
    value = params.get(name)
    if value is None:
        raise SignatureFormatError(
            f"signature parameter {name} is required", code="signature_incomplete"
        )
    if type(value) is not kind:
        raise SignatureFormatError(f"signature parameter {name} has the wrong type")
    return value


# -- fast path for the canonical form ---------------------------------------------------
#
# Almost every client serializes Signature-Input, Signature and Content-Digest the one
# canonical way (one member, no whitespace, quoted-string and integer parameters). For
# exactly that shape a strict regular expression yields the same values as `http_sf`
# at a fraction of the cost, and the member text after "label=" is already the
# serialized inner list the signature base needs. Anything else (several members,
# escapes, tokens, booleans, odd integers, repeated parameters) takes the full parser.

_SF_KEY = r"[a-z*][a-z0-9_\-.*]{0,63}"
_SF_STRING = r'"[\x20\x21\x23-\x5b\x5d-\x7e]*"'
_SF_INT = r"(?:0|-?[1-9][0-9]{0,14})"
_FAST_LIST = rf"\((?:{_SF_STRING}(?: {_SF_STRING})*)?\)"
_FAST_PARAMS = rf"(?:;{_SF_KEY}=(?:{_SF_INT}|{_SF_STRING}))*"
_FAST_INPUT = re.compile(rf"({_SF_KEY})=(({_FAST_LIST})({_FAST_PARAMS}))")
_FAST_ITEM = re.compile(_SF_STRING)
_FAST_PARAM = re.compile(rf";({_SF_KEY})=({_SF_INT}|{_SF_STRING})")
_FAST_BYTES = re.compile(rf"({_SF_KEY})=:([A-Za-z0-9+/]*={{0,2}}):")


def _fast_input(value: str) -> tuple[str, list[str], dict[str, Any], str] | None:
    """(label, components, params, serialized inner list) for the canonical form."""
    match = _FAST_INPUT.fullmatch(value)
    if match is None:
        return None
    label, inner, listed, tail = match.groups()
    # Items are matched, not split: a quoted name may itself hold ")" or " ".
    names = [item[1:-1] for item in _FAST_ITEM.findall(listed)]
    params: dict[str, Any] = {}
    for key, raw in _FAST_PARAM.findall(tail):
        if key in params:
            return None  # repeated parameter: let the full parser decide
        params[key] = raw[1:-1] if raw.startswith('"') else int(raw)
    return label, names, params, inner


def _fast_bytes(value: str) -> tuple[str, bytes] | None:
    """(key, bytes) of a one-member dictionary holding a canonical byte sequence."""
    match = _FAST_BYTES.fullmatch(value)
    if match is None or len(match.group(2)) % 4:
        return None
    try:
        return match.group(1), base64.b64decode(match.group(2), validate=True)
    except ValueError:
        return None


def _parsed_fields(
    sig_input_field: str, signature_field: str, label: str | None
) -> tuple[str, list[str], dict[str, Any], Any, str | None]:
    """Label, components, parameters, signature value and (fast path) serialized inner list."""
    fast = _fast_input(sig_input_field)
    sig = _fast_bytes(signature_field) if fast is not None else None
    if (
        fast is not None
        and sig is not None
        and fast[0] == sig[0]
        and (label is None or label == fast[0])
    ):
        return fast[0], _check_components(fast[1]), fast[2], sig[1], fast[3]
    inputs = _parse_dict(sig_input_field, "Signature-Input")
    signatures = _parse_dict(signature_field, "Signature")
    chosen = label if label is not None else next((k for k in inputs if k in signatures), None)
    if chosen is None or chosen not in inputs or chosen not in signatures:
        raise SignatureFormatError("no signature label is present in both headers")
    names, params = _components_of(inputs[chosen])
    sig_member = signatures[chosen]
    mac = sig_member[0] if isinstance(sig_member, tuple) else sig_member
    return chosen, names, params, mac, None


def verify_request(
    *,
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes | None,
    key_for: Callable[[str], bytes],
    now: float,
    window_s: float,
    query: str = "",
    authority: str = "",
    scheme: str = "https",
    required: Sequence[str] = ("@method", "@path"),
    require_digest: bool | None = None,
    label: str | None = None,
) -> VerifiedSignature:
    """Verify the request's hmac-sha256 signature; return what it says or raise.

    `headers` maps lower-case names to (combined) values. `key_for(keyid)` returns the
    HMAC key or raises an `ApiError` for an unknown keyid. With `body` given, a
    Content-Digest is checked against it (required when the body is not empty);
    with `body=None` the caller streams the body and checks `result.digest` itself
    (`require_digest=True` makes a covered digest mandatory).
    """
    sig_input_field = headers.get("signature-input")
    signature_field = headers.get("signature")
    if not sig_input_field or not signature_field:
        raise SignatureError(
            "Signature-Input and Signature headers are required", code="signature_missing"
        )
    chosen, names, params, mac, serialized = _parsed_fields(sig_input_field, signature_field, label)
    if not isinstance(mac, bytes):
        raise SignatureFormatError("Signature value must be a byte sequence")

    alg = params.get("alg", ALGORITHM)
    if alg != ALGORITHM:
        raise SignatureFormatError(
            "only hmac-sha256 signatures are accepted", code="signature_alg_unsupported"
        )
    created = _param(params, "created", int)
    keyid = _param(params, "keyid", str)
    nonce = _param(params, "nonce", str)
    if not 8 <= len(nonce) <= _MAX_NONCE:
        raise SignatureFormatError("nonce must be 8 to 128 characters")
    for name in required:
        if name not in names:
            raise SignatureFormatError(
                f"the signature must cover {name}", code="signature_incomplete"
            )

    if created < now - window_s:
        raise SignatureExpiredError("signature is too old", code="signature_expired")
    if created > now + window_s:
        raise SignatureExpiredError("signature is from the future", code="signature_future")
    expires = params.get("expires")
    if expires is not None and (type(expires) is not int or expires < now):
        raise SignatureExpiredError("signature has expired", code="signature_expired")

    has_body = body is not None and len(body) > 0
    digest_needed = require_digest if require_digest is not None else has_body
    digest_field = headers.get("content-digest")
    if digest_field is None and ("content-digest" in names or digest_needed):
        raise DigestError("a request with a body needs a Content-Digest", code="digest_missing")
    if digest_needed and "content-digest" not in names:
        raise SignatureFormatError(
            "the signature must cover content-digest", code="signature_incomplete"
        )

    derived = _derived_values(
        method=method, path=path, query=query, authority=authority, scheme=scheme
    )

    def resolve(name: str) -> str:
        return derived[name] if name.startswith("@") else _field_value(headers, name)

    inner = serialized or ser_innerlist(([(c, {}) for c in names], params))
    base = _signature_base(names, inner, resolve)
    key = key_for(keyid)
    expected = hmac.new(key, base, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, mac):
        raise SignatureError("signature does not verify", code="signature_invalid")

    declared: ExpectedDigest | None = None
    if digest_field is not None:
        declared = parse_content_digest(digest_field)
        if body is not None:
            declared.check_body(body)
    return VerifiedSignature(
        label=chosen,
        keyid=keyid,
        nonce=nonce,
        created=created,
        components=tuple(names),
        digest=declared if body is None else None,
    )
