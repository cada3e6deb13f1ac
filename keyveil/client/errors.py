"""What the keyveil client raises.

    ClientError
    ├── ConnectionFailed            the request could not be sent (never reached a server)
    ├── ResponseInterrupted         sent, then the connection broke: the outcome is unknown
    └── ServiceError                an HTTP error answer: status, stable code, Retry-After
        ├── TokenExpiredError       401 token_expired (the client fetches a new token)
        ├── AuthenticationError     other 401s and 403s
        ├── RateLimitedError        429
        ├── UnavailableError        503
        └── UpstreamFailedError     502 / 504 (the provider may have acted: not retried)

Messages carry the server's code and message, never a token or a signing key.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ClientError",
    "ConnectionFailed",
    "RateLimitedError",
    "ResponseInterrupted",
    "ServiceError",
    "TokenExpiredError",
    "UnavailableError",
    "UpstreamFailedError",
    "service_error",
]


class ClientError(Exception):
    """Root of every error the keyveil client raises."""


class ConnectionFailed(ClientError):
    """The request never reached the server (connect error or pool timeout)."""


class ResponseInterrupted(ClientError):
    """The request was sent but no complete answer came back; it is not retried."""


class ServiceError(ClientError):
    """An error answer from the token service or the proxy."""

    def __init__(
        self, status: int, code: str, message: str, *, retry_after_s: float | None = None
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
        super().__init__(f"{status} {code}: {message}")


class TokenExpiredError(ServiceError):
    """The proxy token expired; a new one is needed."""


class AuthenticationError(ServiceError):
    """The token, signature or origin was refused."""


class RateLimitedError(ServiceError):
    """Too many requests; `retry_after_s` says when to try again."""


class UnavailableError(ServiceError):
    """The service (or the provider behind it) is temporarily unavailable."""


class UpstreamFailedError(ServiceError):
    """The provider failed or timed out; the call may have been processed."""


def service_error(
    status: int, code: str, message: str, *, retry_after_s: float | None = None
) -> ServiceError:
    """The most specific `ServiceError` for an answer."""
    kind: type[ServiceError] = ServiceError
    if status == 401 and code == "token_expired":
        kind = TokenExpiredError
    elif status in (401, 403):
        kind = AuthenticationError
    elif status == 429:
        kind = RateLimitedError
    elif status == 503:
        kind = UnavailableError
    elif status in (502, 504):
        kind = UpstreamFailedError
    return kind(status, code, message, retry_after_s=retry_after_s)
