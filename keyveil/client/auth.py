"""Signing proxy requests: one function for any httpx request, and an `httpx.Auth`.

`KeyveilAuth` lets any httpx-based client (the official `openai` package included)
call the proxy unchanged: it fetches and caches a proxy token, signs every request
(RFC 9421 hmac-sha256 over @method, @path and the RFC 9530 Content-Digest, with a
fresh nonce), and on `401 token_expired` fetches a new token and re-sends once; the
proxy refused the first attempt, so nothing reached the provider.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from typing import Any

import httpx

from shared.signing import sign_request

from .errors import ClientError
from .tokens import LoginCallback, Token, TokenSource

__all__ = ["KeyveilAuth", "sign_proxy_request"]

_SIGNATURE_HEADERS = ("content-digest", "signature-input", "signature")


def sign_proxy_request(request: httpx.Request, token: Token, *, origin: str | None = None) -> None:
    """Add Authorization, Origin, Content-Digest and the signature to `request` (body read)."""
    if token.signing_key is None or token.token_id is None:
        raise ClientError(
            f"a {token.mode or 'non-proxy'} token cannot sign proxy requests; ask for mode='proxy'"
        )
    for name in _SIGNATURE_HEADERS:
        request.headers.pop(name, None)
    raw_path, _, raw_query = request.url.raw_path.partition(b"?")
    signed = sign_request(
        method=request.method,
        path=raw_path.decode("ascii"),
        query=raw_query.decode("ascii"),
        authority=request.url.netloc.decode("ascii"),
        scheme=request.url.scheme,
        key=token.signing_key,
        keyid=token.token_id,
        body=request.content,
    )
    request.headers.update(signed)
    request.headers["Authorization"] = f"Bearer {token.token}"
    if origin:
        request.headers["Origin"] = origin


def _is_token_expired(response: httpx.Response) -> bool:
    if response.status_code != 401:
        return False
    try:
        body: Any = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and (body.get("error") or {}).get("code") == "token_expired"


class KeyveilAuth(httpx.Auth):
    """httpx authentication that signs each request with a cached proxy token.

    Either give the token service's URL, or share a `TokenSource` (as
    `SecureAPIClient.auth()` does).
    """

    requires_request_body = True

    def __init__(
        self,
        base_url: str | None = None,
        *,
        origin: str | None = None,
        tokens: TokenSource | None = None,
        auth: LoginCallback | None = None,
    ) -> None:
        """`auth` returns the app's login for the token service (see `TokenSource`)."""
        if tokens is None:
            if base_url is None:
                raise ValueError("KeyveilAuth needs the token service base_url or a TokenSource")
            tokens = TokenSource(base_url, origin=origin, auth=auth)
        self.tokens = tokens
        self.origin = origin if origin is not None else tokens.origin

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        request.read()  # the digest covers the exact bytes sent (multipart streams too)
        token = self.tokens.get_sync()
        sign_proxy_request(request, token, origin=self.origin)
        response = yield request
        if response.status_code == 401:
            response.read()
            if _is_token_expired(response):
                self.tokens.invalidate(token)
                fresh = self.tokens.get_sync(force=True)
                sign_proxy_request(request, fresh, origin=self.origin)
                yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        await request.aread()
        token = await self.tokens.get()
        sign_proxy_request(request, token, origin=self.origin)
        response = yield request
        if response.status_code == 401:
            await response.aread()
            if _is_token_expired(response):
                self.tokens.invalidate(token)
                fresh = await self.tokens.get(force=True)
                sign_proxy_request(request, fresh, origin=self.origin)
                yield request
