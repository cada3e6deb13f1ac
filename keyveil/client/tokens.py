"""Tokens from the token service, cached and refreshed before they expire."""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import random
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from shared.crypto import b64url_decode

from .errors import ClientError, ConnectionFailed, ResponseInterrupted, service_error
from .retry import RetryPolicy, parse_retry_after

__all__ = [
    "PROXY_API_PATH",
    "TOKEN_PATH",
    "LoginCallback",
    "Mode",
    "Token",
    "TokenSource",
    "error_from_response",
    "proxy_root",
]

TOKEN_PATH = "/api/voice-agent/secure-token"  # noqa: S105 - a URL path
PROXY_API_PATH = "/api/voice-agent/proxy/v1"
Mode = Literal["auto", "realtime", "proxy", "demo"]
LoginCallback = Callable[[], "str | Awaitable[str | None] | None"]
"""`auth=`: the app's current login (an OIDC ID token or a backend assertion), or None."""
_DEFAULT_LIFETIME_S = 60.0


def proxy_root(url: str) -> str:
    """`http://host:port` from a proxy URL given with or without the API path."""
    url = url.rstrip("/")
    return url.removesuffix(PROXY_API_PATH).rstrip("/")


@dataclass(frozen=True)
class Token:
    """One token as issued; secret parts are kept out of `repr`."""

    mode: str
    token: str = field(repr=False)
    expires_at: float
    lifetime_s: float
    obtained_at: float  # monotonic clock
    token_id: str | None = None
    signing_key: bytes | None = field(default=None, repr=False)
    proxy_url: str | None = None
    scopes: tuple[str, ...] = ()
    session: Mapping[str, Any] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def can_sign(self) -> bool:
        return self.signing_key is not None and self.token_id is not None

    def remaining_s(self, now: float) -> float:
        return self.obtained_at + self.lifetime_s - now

    def needs_refresh(self, now: float, margin_s: float) -> bool:
        """True inside the refresh margin (at most a fifth of the lifetime)."""
        return self.remaining_s(now) <= min(margin_s, self.lifetime_s / 5)

    @classmethod
    def from_answer(
        cls, data: Mapping[str, Any], *, server_now: float, obtained_at: float
    ) -> Token:
        token = data.get("token")
        if not isinstance(token, str) or not token:
            raise ClientError("the token service answered without a token")
        expires_at = data.get("expires_at")
        if isinstance(expires_at, int | float) and not isinstance(expires_at, bool):
            lifetime = max(0.0, float(expires_at) - server_now)
        else:
            expires_at, lifetime = server_now + _DEFAULT_LIFETIME_S, _DEFAULT_LIFETIME_S
        signing_key = data.get("signing_key")
        scopes = data.get("scopes") or ()
        session = data.get("session")
        return cls(
            mode=str(data.get("mode", "")),
            token=token,
            expires_at=float(expires_at),
            lifetime_s=lifetime,
            obtained_at=obtained_at,
            token_id=str(data["token_id"]) if data.get("token_id") else None,
            signing_key=b64url_decode(signing_key) if isinstance(signing_key, str) else None,
            proxy_url=str(data["proxy_url"]) if data.get("proxy_url") else None,
            scopes=tuple(str(s) for s in scopes),
            session=session if isinstance(session, dict) else None,
            raw=dict(data),
        )


def error_from_response(response: httpx.Response) -> ClientError:
    """The `ServiceError` an error answer stands for (`response` must have been read)."""
    code, message = f"http_{response.status_code}", response.reason_phrase or "error"
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        code = str(error.get("code") or error.get("type") or code)
        message = str(error.get("message") or message)
    return service_error(
        response.status_code,
        code,
        message,
        retry_after_s=parse_retry_after(response.headers.get("retry-after")),
    )


def _login_expired(error: ClientError) -> bool:
    return getattr(error, "code", None) == "login_expired"


def _server_now(response: httpx.Response) -> float:
    """The later of our clock and the server's Date, so a lifetime is never overestimated."""
    now = time.time()
    date = response.headers.get("date")
    if not date:
        return now
    try:
        return max(now, email.utils.parsedate_to_datetime(date).timestamp())
    except (TypeError, ValueError):
        return now


class TokenSource:
    """Fetches tokens from the token service and caches one per mode.

    A cached token is reused until it enters its refresh margin; concurrent callers
    share one fetch. 429/503 answers are retried per the `RetryPolicy`.

    `auth` returns the app's login (sent as `Authorization: Bearer`); it is asked on
    every `get`, and a cached token obtained with another login is fetched again, so
    a refreshed login (or another user) never keeps using the previous one's token.
    """

    def __init__(
        self,
        base_url: str,
        *,
        origin: str | None = None,
        session: Mapping[str, Any] | None = None,
        refresh_margin_s: float = 30.0,
        retry: RetryPolicy | None = None,
        timeout_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        sync_transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        auth: LoginCallback | None = None,
    ) -> None:
        base = base_url.rstrip("/")
        self.auth = auth
        self._logins: dict[str, str | None] = {}
        self.url = base if base.endswith(TOKEN_PATH) else base + TOKEN_PATH
        self.origin = origin
        self.session = dict(session) if session else None
        self.refresh_margin_s = refresh_margin_s
        self.retry = retry or RetryPolicy()
        self.timeout_s = timeout_s
        self.fetches = 0
        self._transport = transport
        self._sync_transport = sync_transport
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._cache: dict[str, Token] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._thread_lock = threading.Lock()

    def cached(self, mode: str = "proxy") -> Token | None:
        token = self._cache.get(mode)
        if token is None or token.needs_refresh(self._clock(), self.refresh_margin_s):
            return None
        return token

    def adopt(self, token: Token, mode: str = "proxy") -> None:
        """Use `token` (e.g. one another client already holds) until it nears expiry."""
        self._cache[mode] = token

    def invalidate(self, token: Token | None = None, mode: str = "proxy") -> None:
        """Forget the cached token (only `token`, if given and still the cached one)."""
        if token is None or self._cache.get(mode) is token:
            self._cache.pop(mode, None)

    async def _login(self) -> str | None:
        if self.auth is None:
            return None
        value = self.auth()
        if inspect.isawaitable(value):
            value = await value
        return value or None

    def _login_sync(self) -> str | None:
        if self.auth is None:
            return None
        value = self.auth()
        if inspect.isawaitable(value):
            if inspect.iscoroutine(value):
                value.close()
            raise TypeError("the synchronous token flow needs a synchronous auth= callback")
        return value or None

    def _same_login(self, mode: str, login: str | None) -> bool:
        return self.auth is None or self._logins.get(mode) == login

    def _request(
        self, mode: str, session: Mapping[str, Any] | None, login: str | None = None
    ) -> tuple[dict[str, Any], dict[str, str]]:
        body: dict[str, Any] = {"mode": mode}
        chosen = session if session is not None else self.session
        if chosen:
            body["session"] = dict(chosen)
        headers = {"Accept": "application/json"}
        if self.origin:
            headers["Origin"] = self.origin
        if login:
            headers["Authorization"] = f"Bearer {login}"
        return body, headers

    def _accept(self, mode: str, response: httpx.Response, login: str | None = None) -> Token:
        token = Token.from_answer(
            response.json(), server_now=_server_now(response), obtained_at=self._clock()
        )
        self.fetches += 1
        self._cache[mode] = token
        self._logins[mode] = login
        return token

    async def get(
        self,
        client: httpx.AsyncClient | None = None,
        mode: str = "proxy",
        *,
        session: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> Token:
        """A valid token for `mode`, fetched only when none is cached or it is about to expire."""
        login = await self._login()
        same = self._same_login(mode, login)
        if not force and same and (token := self.cached(mode)) is not None:
            return token
        lock = self._locks.setdefault(mode, asyncio.Lock())
        stale = self._cache.get(mode)
        async with lock:
            fresh = self.cached(mode)
            # A forced refresh is satisfied by one another caller made while we waited.
            reusable = fresh is not None and (not force or fresh is not stale)
            if reusable and fresh is not None and self._same_login(mode, login):
                return fresh
            if client is not None:
                return await self._fetch_with_login(client, mode, session, login)
            async with httpx.AsyncClient(transport=self._transport, timeout=self.timeout_s) as own:
                return await self._fetch_with_login(own, mode, session, login)

    async def _fetch_with_login(
        self,
        client: httpx.AsyncClient,
        mode: str,
        session: Mapping[str, Any] | None,
        login: str | None,
    ) -> Token:
        """`_fetch`; a login the token service found expired is asked for once more."""
        try:
            return await self._fetch(client, mode, session, login)
        except ClientError as exc:
            if not _login_expired(exc):
                raise
            fresh = await self._login()
            if fresh is None or fresh == login:
                raise
            return await self._fetch(client, mode, session, fresh)

    async def _fetch(
        self,
        client: httpx.AsyncClient,
        mode: str,
        session: Mapping[str, Any] | None,
        login: str | None = None,
    ) -> Token:
        body, headers = self._request(mode, session, login)
        attempt = 0
        while True:
            try:
                answer: httpx.Response | httpx.TransportError = await client.post(
                    self.url, json=body, headers=headers
                )
            except httpx.TransportError as exc:
                answer = exc
            outcome = self._after_attempt(mode, answer, attempt, login)
            if isinstance(outcome, Token):
                return outcome
            await self._sleep(outcome)
            attempt += 1

    def get_sync(
        self,
        client: httpx.Client | None = None,
        mode: str = "proxy",
        *,
        force: bool = False,
    ) -> Token:
        """`get` for synchronous callers (the sync `KeyveilAuth` flow)."""
        login = self._login_sync()
        stale = self._cache.get(mode)
        with self._thread_lock:
            fresh = self.cached(mode)
            reusable = fresh is not None and (not force or fresh is not stale)
            if reusable and fresh is not None and self._same_login(mode, login):
                return fresh
            if client is not None:
                return self._fetch_sync_with_login(client, mode, login)
            with httpx.Client(transport=self._sync_transport, timeout=self.timeout_s) as own:
                return self._fetch_sync_with_login(own, mode, login)

    def _fetch_sync_with_login(self, client: httpx.Client, mode: str, login: str | None) -> Token:
        try:
            return self._fetch_sync(client, mode, login)
        except ClientError as exc:
            if not _login_expired(exc):
                raise
            fresh = self._login_sync()
            if fresh is None or fresh == login:
                raise
            return self._fetch_sync(client, mode, fresh)

    def _fetch_sync(self, client: httpx.Client, mode: str, login: str | None = None) -> Token:
        body, headers = self._request(mode, None, login)
        attempt = 0
        while True:
            try:
                answer: httpx.Response | httpx.TransportError = client.post(
                    self.url, json=body, headers=headers
                )
            except httpx.TransportError as exc:
                answer = exc
            outcome = self._after_attempt(mode, answer, attempt, login)
            if isinstance(outcome, Token):
                return outcome
            time.sleep(outcome)
            attempt += 1

    def _after_attempt(
        self,
        mode: str,
        answer: httpx.Response | httpx.TransportError,
        attempt: int,
        login: str | None = None,
    ) -> Token | float:
        """The token, or how long to wait before trying again; raises when giving up.

        One decision for the async and the sync fetch: a connection that never opened
        is retried with backoff, a request lost after sending is not, and an HTTP
        error is retried only when `_retry_delay` says so (429/503, Retry-After).
        """
        if isinstance(answer, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
            delay = self.retry.delay_s(attempt, None, self._rng)
            if delay is None:
                raise ConnectionFailed(f"cannot reach the token service: {answer}") from None
            return delay
        if isinstance(answer, httpx.TransportError):
            raise ResponseInterrupted(f"token request interrupted: {answer}") from None
        if answer.status_code == 200:
            return self._accept(mode, answer, login)
        error = error_from_response(answer)
        delay = self._retry_delay(answer, error, attempt)
        if delay is None:
            raise error
        return delay

    def _retry_delay(
        self, response: httpx.Response, error: ClientError, attempt: int
    ) -> float | None:
        if response.status_code not in self.retry.retry_statuses:
            return None
        retry_after = getattr(error, "retry_after_s", None)
        return self.retry.delay_s(attempt, retry_after, self._rng)
