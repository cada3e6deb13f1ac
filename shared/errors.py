"""The keyveil error hierarchy, one tree for every boundary.

    KeyveilError
    ├── ConfigError                 invalid configuration at start-up
    ├── BusError                    NATS trouble
    │   ├── BusTimeoutError         a request got no reply in time
    │   └── NoRespondersError       nobody serves the subject
    └── ApiError                    an HTTP answer with a stable code
        ├── BadRequestError         400
        ├── AuthError               401
        ├── ForbiddenError          403
        ├── NotFoundError           404
        ├── RequestTimeoutError     408 (a body that did not arrive in time)
        ├── PayloadTooLargeError    413
        ├── RateLimitedError        429
        ├── UpstreamError           502
        ├── UnavailableError        503
        └── UpstreamTimeoutError    504

Messages never carry secret values: callers pass names and rules, not inputs.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "ApiError",
    "AuthError",
    "BadRequestError",
    "BusError",
    "BusTimeoutError",
    "ConfigError",
    "ForbiddenError",
    "KeyveilError",
    "NoRespondersError",
    "NotFoundError",
    "PayloadTooLargeError",
    "RateLimitedError",
    "RequestTimeoutError",
    "UnavailableError",
    "UpstreamError",
    "UpstreamTimeoutError",
    "error_body",
]


class KeyveilError(Exception):
    """Root of every error keyveil raises on purpose."""


class ConfigError(KeyveilError):
    """Configuration broke a rule; `problems` pairs each variable with the rule it broke."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        lines = "; ".join(f"{name}: {rule}" for name, rule in problems)
        super().__init__(f"invalid configuration: {lines}")


class BusError(KeyveilError):
    """The message bus could not do what was asked."""

    def __init__(self, subject: str, reason: str) -> None:
        self.subject = subject
        self.reason = reason
        super().__init__(f"{subject}: {reason}")


class BusTimeoutError(BusError):
    """A request on `subject` got no reply within the timeout."""


class NoRespondersError(BusError):
    """No service is subscribed to `subject`."""


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    """The one error envelope every HTTP edge answers: `{"error": {"code", "message"}}`."""
    return {"error": {"code": code, "message": message}}


class ApiError(KeyveilError):
    """An error answered over HTTP as `error_body(code, message)`."""

    status: int = 500
    default_code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.code = code or self.default_code
        self.message = message
        self.headers = dict(headers or {})
        super().__init__(f"{self.code}: {message}")


class BadRequestError(ApiError):
    status = 400
    default_code = "bad_request"


class AuthError(ApiError):
    status = 401
    default_code = "unauthorized"


class ForbiddenError(ApiError):
    status = 403
    default_code = "forbidden"


class NotFoundError(ApiError):
    status = 404
    default_code = "not_found"


class RequestTimeoutError(ApiError):
    status = 408
    default_code = "body_timeout"


class PayloadTooLargeError(ApiError):
    status = 413
    default_code = "payload_too_large"


class RateLimitedError(ApiError):
    status = 429
    default_code = "rate_limited"


class UpstreamError(ApiError):
    status = 502
    default_code = "upstream_error"


class UnavailableError(ApiError):
    status = 503
    default_code = "unavailable"


class UpstreamTimeoutError(ApiError):
    status = 504
    default_code = "upstream_timeout"
