"""The refusal contract: every stable error code keyveil answers, in one table.

Each `Refusal` carries its HTTP status, its `Category` (what kind of refusal it is,
the bounded label metrics and the auditor use) and a default message. Both edges (the
proxy and the token service) answer the same condition with the same member, so a
client, a dashboard and the auditor read one vocabulary.

    Refusal.TOKEN_MISSING.error()            -> AuthError(status 401, code "token_missing")
    Refusal.IP_BLOCKED.error(headers=...)    -> RateLimitedError(status 429, code "ip_blocked")
    category_of("signature")                 -> Category.tamper (a v1 event reason)

Codes are stable: renaming one is a breaking change of the public API (README table,
`tests/shared/test_contract.py` keeps both equal).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Final

from shared.errors import (
    ApiError,
    AuthError,
    BadRequestError,
    ForbiddenError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitedError,
    RequestTimeoutError,
    UnavailableError,
    UpstreamError,
    UpstreamTimeoutError,
)

__all__ = [
    "LEGACY_REASONS",
    "STRIKE_CATEGORIES",
    "Category",
    "Refusal",
    "category_of",
    "category_of_status",
    "counts_as_strike",
    "markdown_table",
    "refusal_category",
]


class Category(StrEnum):
    """What kind of refusal: the only value metric `reason` labels take."""

    auth = "auth"  # no or bad credentials: counts toward an IP block
    tamper = "tamper"  # a signature or digest that does not match: an attack signal
    replay = "replay"  # a nonce seen before
    limit = "limit"  # rate limits and budgets
    blocked = "blocked"  # the client IP is blocked after repeated failures
    unavailable = "unavailable"  # a dependency cannot serve now; retry
    bad_request = "bad_request"  # the request itself is malformed
    policy = "policy"  # well-formed but outside the server's policy; not an auth failure
    upstream = "upstream"  # the provider failed or refused
    not_found = "not_found"
    internal = "internal"


_C = Category


class Refusal(StrEnum):
    """A stable refusal code with its status, category and default message."""

    status: int
    category: Category
    message: str

    def __new__(cls, code: str, status: int, category: Category, message: str) -> Refusal:
        member = str.__new__(cls, code)
        member._value_ = code
        member.status = status
        member.category = category
        member.message = message
        return member

    # -- auth ------------------------------------------------------------------------
    TOKEN_MISSING = ("token_missing", 401, _C.auth, "a Bearer proxy token is required")
    TOKEN_INVALID = ("token_invalid", 401, _C.auth, "the token is not valid")
    TOKEN_EXPIRED = ("token_expired", 401, _C.auth, "the token has expired")
    TOKEN_REVOKED = ("token_revoked", 401, _C.auth, "the token was revoked")
    TOKEN_MISMATCH = ("token_mismatch", 403, _C.auth, "the token does not match the path")
    SCOPE_DENIED = ("scope_denied", 403, _C.auth, "the token's scope does not cover this call")
    ORIGIN_MISMATCH = ("origin_mismatch", 403, _C.auth, "the origin does not match the token")
    ORIGIN_FORBIDDEN = ("origin_forbidden", 403, _C.auth, "this origin is not allowed")
    ORIGIN_REQUIRED = ("origin_required", 403, _C.auth, "an Origin header is required")
    CORS_METHOD_FORBIDDEN = ("cors_method_forbidden", 403, _C.auth, "method not allowed by CORS")
    LOGIN_REQUIRED = ("login_required", 401, _C.auth, "a login is required")
    LOGIN_INVALID = ("login_invalid", 401, _C.auth, "the login is not acceptable")
    SIGNATURE_MISSING = ("signature_missing", 401, _C.auth, "the request is not signed")
    SIGNATURE_EXPIRED = ("signature_expired", 401, _C.auth, "the signature is too old")
    SIGNATURE_FUTURE = ("signature_future", 401, _C.auth, "the signature is from the future")
    SIGNATURE_UNKNOWN_KEY = ("signature_unknown_key", 401, _C.auth, "unknown signing key")
    SIGNATURE_INCOMPLETE = (
        "signature_incomplete",
        400,
        _C.auth,
        "the signature does not cover the required components",
    )
    SIGNATURE_ALG_UNSUPPORTED = (
        "signature_alg_unsupported",
        400,
        _C.auth,
        "unsupported signature algorithm",
    )
    SIGNATURE_MALFORMED = ("signature_malformed", 400, _C.auth, "malformed signature headers")
    DIGEST_MISSING = ("digest_missing", 400, _C.auth, "a Content-Digest header is required")
    DIGEST_UNSUPPORTED = ("digest_unsupported", 400, _C.auth, "unsupported digest algorithm")
    DIGEST_MALFORMED = ("digest_malformed", 400, _C.auth, "malformed Content-Digest")
    UNAUTHORIZED = ("unauthorized", 401, _C.auth, "not authorized")
    FORBIDDEN = ("forbidden", 403, _C.auth, "forbidden")
    REQUESTER_MISMATCH = ("requester_mismatch", 403, _C.auth, "the requester does not match")
    ENVIRONMENT_MISMATCH = ("environment_mismatch", 403, _C.auth, "wrong key environment")
    # -- tamper ----------------------------------------------------------------------
    SIGNATURE_INVALID = ("signature_invalid", 401, _C.tamper, "the signature does not verify")
    DIGEST_MISMATCH = ("digest_mismatch", 400, _C.tamper, "the body does not match its digest")
    # -- replay ----------------------------------------------------------------------
    REPLAY_DETECTED = ("replay_detected", 401, _C.replay, "this request was already seen")
    # -- limit -----------------------------------------------------------------------
    RATE_LIMITED = ("rate_limited", 429, _C.limit, "rate limit exceeded")
    BUDGET_EXCEEDED = ("budget_exceeded", 429, _C.limit, "the budget for this period is spent")
    # -- blocked (429 on both edges: it passes with time, Retry-After says when) -------
    IP_BLOCKED = ("ip_blocked", 429, _C.blocked, "this client is temporarily blocked")
    # -- unavailable -----------------------------------------------------------------
    SECURITY_UNAVAILABLE = (
        "security_unavailable",
        503,
        _C.unavailable,
        "security checks are unavailable; try again",
    )
    REVOCATION_UNAVAILABLE = (
        "revocation_unavailable",
        503,
        _C.unavailable,
        "the revocation store is unavailable",
    )
    IDENTITY_UNAVAILABLE = (
        "identity_unavailable",
        503,
        _C.unavailable,
        "the identity provider cannot be reached; try again shortly",
    )
    BUDGET_UNAVAILABLE = (
        "budget_unavailable",
        503,
        _C.unavailable,
        "budgets cannot be checked; try again",
    )
    KEY_UNAVAILABLE = ("key_unavailable", 503, _C.unavailable, "no provider key is available")
    KEK_UNAVAILABLE = ("kek_unavailable", 503, _C.unavailable, "the key custody is unavailable")
    VOICE_UNAVAILABLE = ("voice_unavailable", 503, _C.unavailable, "voice is unavailable")
    UPLOAD_CAPACITY = ("upload_capacity", 503, _C.unavailable, "upload capacity is exhausted")
    NOT_READY = ("not_ready", 503, _C.unavailable, "the service is starting or stopping")
    UNAVAILABLE = ("unavailable", 503, _C.unavailable, "unavailable; try again")
    # -- bad_request -----------------------------------------------------------------
    BAD_REQUEST = ("bad_request", 400, _C.bad_request, "bad request")
    INVALID_JSON = ("invalid_json", 400, _C.bad_request, "the body is not valid JSON")
    INVALID_BODY = ("invalid_body", 400, _C.bad_request, "the body is not acceptable")
    INVALID_REQUEST = ("invalid_request", 400, _C.bad_request, "the request is not valid")
    INVALID_MULTIPART = ("invalid_multipart", 400, _C.bad_request, "malformed multipart body")
    MALFORMED_REQUEST = ("malformed_request", 400, _C.bad_request, "malformed request")
    FIELD_NOT_ALLOWED = ("field_not_allowed", 400, _C.bad_request, "a field is not allowed")
    FILE_MISSING = ("file_missing", 400, _C.bad_request, "the upload has no file")
    UNKNOWN_MODE = ("unknown_mode", 400, _C.bad_request, "unknown token mode")
    DEMO_DISABLED = ("demo_disabled", 400, _C.bad_request, "demo mode is disabled")
    SCOPE_NOT_ALLOWED = ("scope_not_allowed", 400, _C.bad_request, "scope not allowed")
    TRANSPORT_INVALID = ("transport_invalid", 400, _C.bad_request, "invalid transport")
    SESSION_INVALID = ("session_invalid", 400, _C.bad_request, "invalid session")
    SDP_INVALID = ("sdp_invalid", 400, _C.bad_request, "invalid SDP offer")
    SDP_NOT_OFFER = ("sdp_not_offer", 400, _C.bad_request, "the SDP is not an offer")
    SDP_TOO_LARGE = ("sdp_too_large", 400, _C.bad_request, "the SDP offer is too large")
    BAD_BACKUP = ("bad_backup", 400, _C.bad_request, "not a valid backup document")
    BAD_BACKUP_SIGNATURE = (
        "bad_backup_signature",
        400,
        _C.bad_request,
        "the backup's signature does not verify",
    )
    BAD_SEAL = ("bad_seal", 400, _C.bad_request, "the sealed request is malformed")
    INVALID_PUBLIC_KEY = ("invalid_public_key", 400, _C.bad_request, "invalid public key")
    KEM_NOT_ALLOWED = ("kem_not_allowed", 400, _C.bad_request, "key encapsulation not allowed")
    STALE_INTAKE_KEY = ("stale_intake_key", 400, _C.bad_request, "the intake key is stale")
    INVALID_HTTP = ("invalid_http", 400, _C.bad_request, "the request is not valid HTTP")
    URL_TOO_LONG = ("url_too_long", 414, _C.bad_request, "the request target is too long")
    HEADERS_TOO_LARGE = (
        "headers_too_large",
        431,
        _C.bad_request,
        "too many or too large request header fields",
    )
    HEADER_TIMEOUT = ("header_timeout", 408, _C.bad_request, "the request head took too long")
    BODY_TIMEOUT = ("body_timeout", 408, _C.bad_request, "the body did not arrive in time")
    PAYLOAD_TOO_LARGE = ("payload_too_large", 413, _C.bad_request, "the body is too large")
    UNSUPPORTED_MEDIA_TYPE = (
        "unsupported_media_type",
        415,
        _C.bad_request,
        "unsupported content type",
    )
    METHOD_NOT_ALLOWED = ("method_not_allowed", 405, _C.bad_request, "method not allowed")
    CONFLICT = ("conflict", 409, _C.bad_request, "conflict")
    # -- policy ----------------------------------------------------------------------
    MODEL_REQUIRED = ("model_required", 400, _C.policy, "the request must name a model")
    MODEL_MISSING = ("model_missing", 400, _C.policy, "the request must name a model")
    MODEL_NOT_ALLOWED = ("model_not_allowed", 403, _C.policy, "this model is not allowed")
    VOICE_NOT_ALLOWED = ("voice_not_allowed", 403, _C.policy, "this voice is not allowed")
    INSTRUCTIONS_NOT_ALLOWED = (
        "instructions_not_allowed",
        403,
        _C.policy,
        "instructions are not allowed",
    )
    TOOL_NOT_ALLOWED = ("tool_not_allowed", 403, _C.policy, "this tool is not allowed")
    SESSION_FIELD_NOT_ALLOWED = (
        "session_field_not_allowed",
        400,
        _C.policy,
        "a session field is not allowed",
    )
    POLICY_LIMIT_EXCEEDED = (
        "policy_limit_exceeded",
        400,
        _C.policy,
        "a parameter exceeds the policy's cap",
    )
    # -- upstream --------------------------------------------------------------------
    UPSTREAM_ERROR = ("upstream_error", 502, _C.upstream, "the provider failed")
    UPSTREAM_UNREACHABLE = ("upstream_unreachable", 502, _C.upstream, "the provider is unreachable")
    UPSTREAM_MALFORMED = ("upstream_malformed", 502, _C.upstream, "the provider's answer is bad")
    UPSTREAM_REFUSED = ("upstream_refused", 502, _C.upstream, "the provider refused")
    UPSTREAM_RATE_LIMITED = ("upstream_rate_limited", 502, _C.upstream, "the provider is busy")
    UPSTREAM_AUTH_FAILED = (
        "upstream_auth_failed",
        502,
        _C.upstream,
        "the provider refused the key",
    )
    UPSTREAM_TIMEOUT = ("upstream_timeout", 504, _C.upstream, "the provider did not answer in time")
    # -- not_found / internal --------------------------------------------------------
    NOT_FOUND = ("not_found", 404, _C.not_found, "not found")
    KEY_NOT_FOUND = ("key_not_found", 404, _C.not_found, "no such key")
    KEY_INTEGRITY = ("key_integrity", 503, _C.internal, "a key record failed its integrity check")
    INTERNAL_ERROR = ("internal_error", 500, _C.internal, "internal error")

    @classmethod
    def parse(cls, code: str) -> Refusal | None:
        """The member for `code`, or None when it is not a contract code."""
        return _BY_CODE.get(code)

    def error(
        self, message: str | None = None, *, headers: Mapping[str, str] | None = None
    ) -> ApiError:
        """The `ApiError` to raise for this refusal (its class follows the status).

        An `unavailable` refusal always says when to try again (`Retry-After`, one second
        unless the raiser knows better): clients and SDKs back off instead of hammering.
        """
        if self.category is Category.unavailable and not any(
            name.lower() == "retry-after" for name in headers or {}
        ):
            headers = {**(headers or {}), "Retry-After": _UNAVAILABLE_RETRY_AFTER}
        kind = _ERROR_BY_STATUS.get(self.status, ApiError)
        error = kind(message or self.message, code=self.value, headers=headers)
        error.status = self.status
        return error


_UNAVAILABLE_RETRY_AFTER: Final = "1"
_BY_CODE: Final[dict[str, Refusal]] = {member.value: member for member in Refusal}
_CATEGORIES: Final = frozenset(member.value for member in Category)

_ERROR_BY_STATUS: Final[dict[int, type[ApiError]]] = {
    400: BadRequestError,
    401: AuthError,
    403: ForbiddenError,
    404: NotFoundError,
    408: RequestTimeoutError,
    413: PayloadTooLargeError,
    429: RateLimitedError,
    502: UpstreamError,
    503: UnavailableError,
    504: UpstreamTimeoutError,
}

# Refusals that count toward blocking the client IP: signs of a credential attack. A
# policy refusal (a misconfigured client) or a block itself does not count: blocking
# everyone behind one NAT for a wrong model name would be worse than the request.
# Only 401/403 answers count: a malformed signature header (400) is a broken client.
STRIKE_CATEGORIES: Final = frozenset({Category.auth, Category.tamper, Category.replay})


def counts_as_strike(error: ApiError) -> bool:
    """True when this refusal counts toward blocking the client IP."""
    return error.status in (401, 403) and refusal_category(error) in STRIKE_CATEGORIES


_BY_STATUS_CATEGORY: Final[dict[int, Category]] = {
    401: Category.auth,
    403: Category.auth,
    404: Category.not_found,
    429: Category.limit,
    502: Category.upstream,
    503: Category.unavailable,
    504: Category.upstream,
}


def refusal_category(error: ApiError) -> Category:
    """The category of an `ApiError`: from its code, or from its status for an unknown code."""
    refusal = Refusal.parse(error.code)
    if refusal is not None:
        return refusal.category
    return category_of_status(error.status)


def category_of_status(status: int) -> Category:
    """The category an answer's status stands for, when its code says nothing."""
    if status < 500:
        return _BY_STATUS_CATEGORY.get(status, Category.bad_request)
    return _BY_STATUS_CATEGORY.get(status, Category.internal)


# Reasons written by v1 producers (before the contract), still in the streams for the
# retention period: each maps onto the category it meant.
LEGACY_REASONS: Final[Mapping[str, Category]] = {
    "invalid_token": _C.auth,
    "missing_token": _C.auth,
    "missing_signature": _C.auth,
    "expired": _C.auth,
    "scope": _C.auth,
    "revoked": _C.auth,
    "origin": _C.auth,
    "token": _C.auth,
    "login": _C.auth,
    "signature": _C.tamper,
    "digest": _C.tamper,
    "tampered": _C.tamper,
    "bad_signature": _C.tamper,
    "replay": _C.replay,
    "nonce_reused": _C.replay,
    "blocked": _C.blocked,
}


def category_of(reason: str | None) -> Category | None:
    """The category a usage event's `reason` stands for: a code, a category or a v1 reason."""
    if not reason:
        return None
    reason = reason.lower()
    refusal = Refusal.parse(reason)
    if refusal is not None:
        return refusal.category
    if reason in _CATEGORIES:
        return Category(reason)
    if reason in LEGACY_REASONS:
        return LEGACY_REASONS[reason]
    if reason.startswith("invalid_login") or reason.startswith("login_"):
        return _C.auth
    if reason.startswith("signature_"):
        return _C.auth
    return None


def markdown_table() -> str:
    """The README's error table (`python -m shared.contract` prints it)."""
    rows = ["| code | status | category | meaning |", "|---|---|---|---|"]
    for category in Category:
        for refusal in Refusal:
            if refusal.category is category:
                rows.append(
                    f"| `{refusal.value}` | {refusal.status} | {category.value} | "
                    f"{refusal.message} |"
                )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
