"""HTTP edge of the token service: thin views over issuance, admission and revocation."""

from __future__ import annotations

import email.utils
import logging
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from services.token.apidocs import ISSUE_DOCS, LEGACY_DOCS, REVOKE_DOCS
from services.token.demo import demo_router
from services.token.identity import Authenticator, LoginError, authenticator_for
from services.token.issuance import Issued, TokenIssuer
from services.token.metrics import (
    AUTH_FAILURES,
    ISSUANCE_LATENCY,
    LEGACY_REQUESTS,
    LOGIN_FAILURES,
    TOKENS_ISSUED,
    mode_label,
)
from services.token.models import parse_token_request
from services.token.origins import OriginPolicy
from services.token.realtime import RealtimeMinter, SessionPolicy
from services.token.revocation import Revoker
from services.token.settings import Settings
from shared.contract import Category, Refusal, counts_as_strike, refusal_category
from shared.errors import ApiError
from shared.events import AuditEvent, EventPublisher, UsageEvent
from shared.eventschema import Fallback, Refused, TokenRevoked
from shared.guard import SignedRequest
from shared.httpedge import IpNetwork, client_ip, parse_networks, read_body_capped, signed_scheme
from shared.policy import PolicyHolder, default_policy
from shared.ratelimit import Admission, Decision, Limit
from shared.runtime import ServiceRuntime

__all__ = ["SECURE_TOKEN_PATH", "TokenService", "create_app"]

log = logging.getLogger(__name__)

SECURE_TOKEN_PATH = "/api/voice-agent/secure-token"  # noqa: S105 - a path
LEGACY_TOKEN_PATH = "/api/voice-agent/token"  # noqa: S105 - a path
ISSUE_LAYER = "token_ip"
_ISSUE_METHODS = ("POST",)
_ISSUE_HEADERS = ("Content-Type",)
_LOGIN_ISSUE_HEADERS = ("Authorization", "Content-Type")  # oidc and assertion modes
_REVOKE_METHODS = ("DELETE",)
_REVOKE_HEADERS = ("Authorization", "Content-Digest", "Signature", "Signature-Input")
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


# Error codes as the auditor's detectors name reasons (services/auditor/detectors.py).
@dataclass
class TokenService:
    """Everything a request needs, built once in the lifespan."""

    settings: Settings
    events: EventPublisher
    admission: Admission
    issuer: TokenIssuer
    revoker: Revoker
    origins: OriginPolicy
    trusted: list[IpNetwork]
    authenticator: Authenticator

    def client_ip(self, request: Request) -> str:
        peer = request.client.host if request.client else None
        return client_ip(peer, request.headers.get("x-forwarded-for"), self.trusted)

    def scheme(self, request: Request) -> str:
        peer = request.client.host if request.client else None
        forwarded = request.headers.get("x-forwarded-proto")
        return signed_scheme(request.url.scheme, peer, forwarded, self.trusted)

    def legacy_headers(self) -> dict[str, str]:
        return {
            "Deprecation": f"@{self.settings.legacy_deprecated_at}",
            "Sunset": email.utils.formatdate(self.settings.legacy_sunset_at, usegmt=True),
            "Link": f'<{SECURE_TOKEN_PATH}>; rel="successor-version"',
        }

    async def issue(self, request: Request, *, legacy: bool) -> Response:
        started = time.perf_counter()
        origin = request.headers.get("origin")
        ip = self.client_ip(request)
        extra = {**self.origins.response_headers(origin), **_NO_STORE}
        if legacy:
            LEGACY_REQUESTS.inc()
            extra.update(self.legacy_headers())
        mode: str | None = None
        try:
            self.origins.check(origin, required=True)
            decision = await self.admission.check(
                limits=[Limit(ISSUE_LAYER, ip, self.settings.rate_limit_per_minute, 60.0)],
                client_ip=ip,
            )
            if not decision.allowed:
                raise await self._refusal(decision, ip)
            principal = await self.authenticator.authenticate(request.headers, origin=origin)
            body = await read_body_capped(
                request, self.settings.max_body_bytes, self.settings.body_timeout_s
            )
            wanted = parse_token_request(body)
            mode = wanted.mode
            issued = await self.issuer.issue(wanted, origin=origin, principal=principal)
        except LoginError as exc:
            LOGIN_FAILURES.labels(self.authenticator.mode, exc.why).inc()
            AUTH_FAILURES.labels("token", Category.auth).inc()
            if await self.admission.strike(ip, Category.auth):
                self._blocked_event(ip)
            self._count_failure(exc, mode=mode, ip=ip, path=request.url.path, started=started)
            exc.headers.update(extra)
            raise
        except ApiError as exc:
            self._count_failure(exc, mode=mode, ip=ip, path=request.url.path, started=started)
            exc.headers.update(extra)
            raise
        self._count_success(issued, ip=ip, path=request.url.path, started=started)
        return JSONResponse(issued.body, headers={**decision.headers(), **extra})

    async def revoke(self, request: Request, token_id: str) -> Response:
        started = time.perf_counter()
        origin = request.headers.get("origin")
        ip = self.client_ip(request)
        extra = {**self.origins.response_headers(origin), **_NO_STORE}
        try:
            self.origins.check(origin, required=False)
            body = await read_body_capped(
                request, self.settings.max_body_bytes, self.settings.body_timeout_s
            )
            claims = await self.revoker.revoke_signed(
                token_id=token_id,
                request=SignedRequest(
                    method=request.method,
                    path=request.url.path,
                    query=request.url.query,
                    authority=request.headers.get("host", ""),
                    scheme=self.scheme(request),
                    headers={k.lower(): v for k, v in request.headers.items()},
                    body=body,
                ),
                client_ip=ip,
            )
        except ApiError as exc:
            category = refusal_category(exc)
            if counts_as_strike(exc):
                AUTH_FAILURES.labels("token", category).inc()
                if await self.admission.strike(ip, category):
                    self._blocked_event(ip)
            self.events.emit(
                UsageEvent(
                    service="token",
                    type="token.revoke_denied",
                    outcome="denied" if exc.status < 500 else "error",
                    reason=Refused.of(exc),
                    status=exc.status,
                    client_ip=ip,
                    token_id=token_id if exc.code == Refusal.REPLAY_DETECTED else None,
                    path=request.url.path,
                    latency_ms=(time.perf_counter() - started) * 1000,
                )
            )
            exc.headers.update(extra)
            raise
        self.events.emit(
            AuditEvent(
                service="token",
                type="token.revoked",
                actor="token-holder",
                detail=TokenRevoked(via="signed_delete", token_id=token_id, session_id=claims.sid),
            )
        )
        self.events.emit(
            UsageEvent(
                service="token",
                type="token.revoked",
                client_ip=ip,
                token_id=token_id,
                session_id=claims.sid,
                path=request.url.path,
                status=200,
                latency_ms=(time.perf_counter() - started) * 1000,
            )
        )
        return JSONResponse(
            {"revoked": True, "token_id": token_id, "expires_at": claims.exp}, headers=extra
        )

    def preflight(
        self, request: Request, *, methods: tuple[str, ...], headers: tuple[str, ...]
    ) -> Response:
        answer = self.origins.preflight(
            request.headers.get("origin"),
            request.headers.get("access-control-request-method"),
            methods=methods,
            headers=headers,
        )
        return Response(status_code=204, headers=answer)

    async def _refusal(self, decision: Decision, ip: str) -> ApiError:
        refusal = decision.refusal or Refusal.SECURITY_UNAVAILABLE
        if refusal is Refusal.RATE_LIMITED and await self.admission.strike(ip, Category.limit):
            self._blocked_event(ip)
        return refusal.error(headers=decision.headers())

    def _blocked_event(self, ip: str) -> None:
        self.events.emit(
            UsageEvent(
                service="token",
                type="ip.blocked",
                outcome="denied",
                reason=Refused.of(Refusal.IP_BLOCKED),
                client_ip=ip,
            )
        )

    def _count_success(self, issued: Issued, *, ip: str, path: str, started: float) -> None:
        elapsed = time.perf_counter() - started
        who = issued.principal
        TOKENS_ISSUED.labels(issued.mode, "ok").inc()
        ISSUANCE_LATENCY.labels(issued.mode).observe(elapsed)
        self.events.emit(
            UsageEvent(
                service="token",
                type="token.issued",
                outcome="ok",
                reason=Fallback.of(issued.fallback_reason) if issued.fallback_reason else None,
                status=200,
                client_ip=ip,
                token_id=issued.token_id,
                session_id=issued.session_id,
                mode=issued.mode,
                user=who.sub if who else None,
                app=who.app if who else None,
                path=path,
                latency_ms=elapsed * 1000,
            )
        )

    def _count_failure(
        self, exc: ApiError, *, mode: str | None, ip: str, path: str, started: float
    ) -> None:
        elapsed = time.perf_counter() - started
        result: Literal["denied", "error"] = "error" if exc.status >= 500 else "denied"
        label = mode_label(mode)
        TOKENS_ISSUED.labels(label, result).inc()
        ISSUANCE_LATENCY.labels(label).observe(elapsed)
        if result == "error":
            log.warning(
                "token request failed",
                extra={"fields": {"code": exc.code, "status": exc.status, "mode": label}},
            )
        self.events.emit(
            UsageEvent(
                service="token",
                type="token.denied" if result == "denied" else "token.error",
                outcome=result,
                reason=Refused.of(exc, why=exc.why if isinstance(exc, LoginError) else None),
                status=exc.status,
                client_ip=ip,
                mode=mode,
                path=path,
                latency_ms=elapsed * 1000,
            )
        )


async def _service(request: Request) -> TokenService:
    # async on purpose: FastAPI runs a plain `def` dependency in its thread pool,
    # a thread hand-off on every request for a dictionary lookup.
    service: TokenService = request.app.state.service
    return service


Service = Annotated[TokenService, Depends(_service)]


def create_app(settings: Settings) -> FastAPI:
    # The usage policy (ConfigError here refuses the start); REALTIME_MODELS and
    # REALTIME_VOICES are the realtime defaults when the file does not say.
    policy = PolicyHolder(
        settings.policy_file,
        service="token",
        base=default_policy(
            realtime_models=settings.realtime_models, realtime_voices=settings.realtime_voices
        ),
    )
    authenticator = authenticator_for(settings, known_tiers=lambda: policy.current.tier_names)
    runtime = ServiceRuntime.for_edge(settings, service="token")

    async def build() -> None:
        runtime.closing(authenticator)
        http = runtime.closing(
            httpx.AsyncClient(
                timeout=httpx.Timeout(settings.upstream_timeout_s),
                limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
                follow_redirects=False,
            )
        )
        keyring = settings.keyring()
        admission = Admission(
            runtime.redis,
            service="token",
            failure_modes={ISSUE_LAYER: settings.rate_limit_failure_mode},
            block_after_strikes=settings.block_after_strikes,
            strike_window_s=settings.strike_window_s,
            block_for_s=settings.block_for_s,
        )
        app.state.service = TokenService(
            settings=settings,
            events=runtime.publisher,
            admission=admission,
            issuer=TokenIssuer(
                keyring=keyring,
                minter=RealtimeMinter(
                    http=http,
                    leases=runtime.leases,
                    base_url=settings.openai_base_url,
                    duration_s=settings.token_duration_s,
                ),
                policy=SessionPolicy(policy),
                duration_s=settings.token_duration_s,
                proxy_url=settings.proxy_public_url,
                scopes=settings.proxy_scopes,
                demo_mode=settings.demo_mode,
            ),
            revoker=Revoker(
                redis_client=runtime.redis,
                keyring=keyring,
                admission=admission,
                window_s=settings.signature_window_s,
            ),
            origins=OriginPolicy(settings.allowed_origins),
            trusted=parse_networks(settings.trusted_proxies),
            authenticator=authenticator,
        )
        policy.start()
        runtime.stack.push_async_callback(policy.stop)
        log.info(
            "token service ready",
            extra={
                "fields": {
                    "demo_mode": settings.demo_mode,
                    "env": settings.node_env.value,
                    "auth_mode": settings.auth_mode,
                }
            },
        )

    app = runtime.app("keyveil token service", build)
    demo = demo_router(settings)  # the browser demo page: development or demo mode only
    if demo is not None:
        app.include_router(demo)

    @app.post(SECURE_TOKEN_PATH, **ISSUE_DOCS)
    async def secure_token(request: Request, service: Service) -> Response:
        return await service.issue(request, legacy=False)

    @app.post(LEGACY_TOKEN_PATH, **LEGACY_DOCS)
    async def legacy_token(request: Request, service: Service) -> Response:
        return await service.issue(request, legacy=True)

    @app.options(SECURE_TOKEN_PATH, include_in_schema=False)
    @app.options(LEGACY_TOKEN_PATH, include_in_schema=False)
    async def token_preflight(request: Request, service: Service) -> Response:
        headers = _ISSUE_HEADERS if settings.auth_mode == "anonymous" else _LOGIN_ISSUE_HEADERS
        return service.preflight(request, methods=_ISSUE_METHODS, headers=headers)

    @app.delete(SECURE_TOKEN_PATH + "/{token_id}", **REVOKE_DOCS)
    async def revoke_token(token_id: str, request: Request, service: Service) -> Response:
        return await service.revoke(request, token_id)

    @app.options(SECURE_TOKEN_PATH + "/{token_id}", include_in_schema=False)
    async def revoke_preflight(request: Request, service: Service) -> Response:
        return service.preflight(request, methods=_REVOKE_METHODS, headers=_REVOKE_HEADERS)

    return app
