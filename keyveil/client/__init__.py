"""The keyveil Python SDK: short-lived tokens, signed proxy calls, never a provider key.

from keyveil.client import SecureAPIClient, KeyveilAuth
"""

from __future__ import annotations

from .api import SecureAPIClient
from .auth import KeyveilAuth, sign_proxy_request
from .errors import (
    AuthenticationError,
    ClientError,
    ConnectionFailed,
    RateLimitedError,
    ResponseInterrupted,
    ServiceError,
    TokenExpiredError,
    UnavailableError,
    UpstreamFailedError,
)
from .retry import RetryPolicy, parse_retry_after
from .streaming import ChatStream
from .tokens import LoginCallback, Token, TokenSource

__all__ = [
    "AuthenticationError",
    "ChatStream",
    "ClientError",
    "ConnectionFailed",
    "KeyveilAuth",
    "LoginCallback",
    "RateLimitedError",
    "ResponseInterrupted",
    "RetryPolicy",
    "SecureAPIClient",
    "ServiceError",
    "Token",
    "TokenExpiredError",
    "TokenSource",
    "UnavailableError",
    "UpstreamFailedError",
    "parse_retry_after",
    "sign_proxy_request",
]
