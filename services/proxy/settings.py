"""Proxy settings: the names come from docs/contracts.md; secrets have no defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from urllib.request import getproxies_environment

from pydantic import Field, field_validator, model_validator

from shared.errors import ConfigError
from shared.ratelimit import FailureMode
from shared.settings import CommaList, EdgeSettings, split_commas
from shared.voicepolicy import (
    DEFAULT_LIVE_MODELS,
    DEFAULT_REALTIME_MODELS,
    DEFAULT_VOICES,
    VoicePolicy,
)

from .transport import EgressProxyError, TransportKind, choose_transport

__all__ = ["Settings", "with_database"]


MIB = 1024 * 1024


class Settings(EdgeSettings):
    """Environment of `python -m services.proxy`."""

    port: int = Field(default=8081, ge=0, le=65535, validation_alias="KEYVEIL_PORT")
    """TCP port the service listens on (HTTP: API, /healthz, /readyz, /metrics)."""
    http_server: Literal["uvicorn", "granian"] = Field(
        default="uvicorn", validation_alias="KEYVEIL_HTTP_SERVER"
    )
    """ASGI server: uvicorn (bounded httptools protocol) or granian (Rust HTTP/1.1; enforces
    the head timeout and a buffer cap, not the header-count bounds). See shared/serving.py."""
    workers: int = Field(default=1, ge=1, le=64, validation_alias="KEYVEIL_WORKERS")
    """Worker processes on the one port (SO_REUSEPORT); above 1, /metrics answers for all
    of them through PROMETHEUS_MULTIPROC_DIR (a temporary directory when unset)."""
    rate_limit_per_min: int = Field(
        default=120, ge=1, le=1_000_000, validation_alias="VOICE_AGENT_PROXY_RATE_LIMIT"
    )
    """Proxy requests per token per minute."""
    ip_rate_limit_per_min: int = Field(
        default=600, ge=1, le=10_000_000, validation_alias="VOICE_AGENT_PROXY_IP_RATE_LIMIT"
    )
    """Proxy requests per client IP per minute."""
    user_rate_limit_per_min: int = Field(
        default=300, ge=1, le=1_000_000, validation_alias="VOICE_AGENT_USER_RATE_LIMIT"
    )
    """Proxy requests per user (hashed principal) per minute, across all their tokens."""
    rate_limit_failure_mode: FailureMode = Field(
        default=FailureMode.closed, validation_alias="PROXY_RATE_LIMIT_FAILURE_MODE"
    )
    """What the per-token, per-IP and per-user limits do when Redis is unreachable: closed
    (503 security_unavailable), open (allow) or local (a per-process limit)."""
    prices_file: Path | None = Field(default=None, validation_alias="KEYVEIL_PRICES_FILE")
    """The price table (shared/pricing.py); default the shipped shared/prices.toml."""
    budgets: bool = Field(default=False, validation_alias="KEYVEIL_BUDGETS")
    """Enforce the spend budgets in Redis (shared/budgets.py) on chat and Responses calls."""
    budget_hold_ttl_s: float = Field(
        default=300.0, ge=1, le=3600, validation_alias="KEYVEIL_BUDGET_HOLD_TTL_S"
    )
    """Seconds a budget reservation counts if never settled (a proxy killed mid-answer)."""
    budget_failure_mode: Literal["closed", "open"] = Field(
        default="closed", validation_alias="KEYVEIL_BUDGET_FAILURE_MODE"
    )
    """While Redis is unreachable, budgeted calls are refused (closed, 503 budget_unavailable)
    or let through uncounted (open); only reached when PROXY_RATE_LIMIT_FAILURE_MODE is not
    closed (else the admission refuses first)."""
    budget_burn_interval_s: float = Field(
        default=30.0, ge=0, le=3600, validation_alias="BUDGET_BURN_INTERVAL_S"
    )
    """Seconds between readings of the budget burn gauge (keyveil_budget_burn_ratio; one
    read of every configured budget per replica); 0 turns it off."""

    max_json_body_bytes: int = Field(
        default=4 * MIB, ge=1024, le=64 * MIB, validation_alias="PROXY_MAX_JSON_BYTES"
    )
    """Largest JSON request body forwarded, in bytes."""
    # OpenAI's 25 MB file limit, plus room for the multipart framing and the model field.
    max_upload_bytes: int = Field(
        default=25 * MIB + 64 * 1024,
        ge=1024,
        le=256 * MIB,
        validation_alias="PROXY_MAX_UPLOAD_BYTES",
    )
    """Largest multipart upload (speech-to-text) forwarded, in bytes."""

    upstream_connect_timeout_s: float = Field(
        default=5.0, gt=0, le=60, validation_alias="UPSTREAM_CONNECT_TIMEOUT_S"
    )
    """Seconds to connect to the upstream."""
    upstream_read_timeout_s: float = Field(
        default=120.0, gt=0, le=900, validation_alias="UPSTREAM_READ_TIMEOUT_S"
    )
    """Seconds the upstream may stay silent while answering."""
    upstream_max_connections: int = Field(
        default=200, ge=1, le=10_000, validation_alias="UPSTREAM_MAX_CONNECTIONS"
    )
    """Pooled upstream connections per proxy process."""
    upstream_transport: TransportKind = Field(default="auto", validation_alias="UPSTREAM_TRANSPORT")
    """The upstream HTTP client: `http1` (the proxy's own, fastest; direct egress only),
    `httpx` (honours HTTPS_PROXY/HTTP_PROXY/ALL_PROXY with NO_PROXY; ~15x the CPU per
    call), or `auto`: httpx exactly when an egress proxy applies to the upstream host,
    else http1. The choice and its reason are logged once at start-up."""
    token_cache_size: int = Field(default=10_000, ge=1, validation_alias="PROXY_TOKEN_CACHE_SIZE")
    """Verified tokens cached per proxy process."""

    cache_ttl_s: int = Field(
        default=3600, ge=1, le=7 * 86_400, validation_alias="PROXY_CACHE_TTL_S"
    )
    """Seconds an opted-in (X-Keyveil-Cache) speech answer stays in the Redis cache."""
    cache_max_entry_bytes: int = Field(
        default=2 * MIB, ge=0, le=32 * MIB, validation_alias="PROXY_CACHE_MAX_ENTRY_BYTES"
    )
    """Largest answer stored in the response cache, in bytes (0 disables it)."""

    cache_redis_url: str | None = Field(default=None, validation_alias="PROXY_CACHE_REDIS_URL")
    """The cache's own Redis (default: REDIS_URL's server, database 1), so that cache
    entries can be evicted (allkeys-lru) without ever evicting a limit or a nonce."""

    # A client that does not read its answer for this long is cut (shared.httpprotocol).
    write_timeout_s: float = Field(
        default=30.0, gt=0, le=3600, validation_alias="PROXY_WRITE_TIMEOUT_S"
    )
    """Seconds a proxied answer may wait on a client that stops reading; then the client is
    disconnected and the upstream call cancelled, so its pool slot returns."""
    body_read_timeout_s: float = Field(
        default=15.0, gt=0, le=600, validation_alias="PROXY_BODY_READ_TIMEOUT_S"
    )
    """Seconds a request body may sit idle between chunks (then 408 body_timeout)."""
    body_total_timeout_s: float = Field(
        default=300.0, gt=0, le=3600, validation_alias="PROXY_BODY_TOTAL_TIMEOUT_S"
    )
    """Seconds a whole request body may take to arrive (then 408 body_timeout)."""
    # Uploads in flight at once, in bytes: the spool (memory, then PROXY_SPOOL_DIR) never
    # holds more. The default leaves room in the 64 MiB /tmp of the deployment.
    spool_budget_bytes: int = Field(
        default=56 * MIB, ge=1024, le=64 * 1024 * MIB, validation_alias="PROXY_SPOOL_BUDGET_BYTES"
    )
    """Bytes of uploads this process may spool at once; over it, 503 upload_capacity.
    Must be at least PROXY_MAX_UPLOAD_BYTES and fit the spool directory's volume."""
    spool_dir: Path | None = Field(default=None, validation_alias="PROXY_SPOOL_DIR")
    """Where uploads are spooled while their digest is checked (default: the system temp dir)."""

    refusal_event_interval_s: float = Field(
        default=1.0, gt=0, le=300, validation_alias="PROXY_REFUSAL_EVENT_INTERVAL_S"
    )
    """Unauthenticated refusals: at most one usage event per reason and client per interval."""
    outbox_dir: Path | None = Field(default=None, validation_alias="PROXY_OUTBOX_DIR")
    """Local outbox for usage events not yet acknowledged by JetStream, replayed after a crash
    (kill -9, OOM); files go in its `proxy` subdirectory (0700). Unset: memory only. Survives a
    process or container restart, not a machine crash (no fsync); `keyveil up` uses its state
    directory, the k8s manifests an emptyDir."""

    @field_validator("spool_dir")
    @classmethod
    def _spool_dir_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError("must be an existing directory")
        return value

    @model_validator(mode="after")
    def _transport_fits_the_egress(self) -> Self:
        # Starting with a client that ignores the egress proxy would leave the token
        # service (httpx honours it) working and the proxy not: refuse instead.
        try:
            choose_transport(
                self.upstream_transport, self.openai_base_url, getproxies_environment()
            )
        except EgressProxyError as exc:
            raise ConfigError([(exc.variable, exc.rule)]) from None
        return self

    @model_validator(mode="after")
    def _budget_fits_an_upload(self) -> Self:
        if self.spool_budget_bytes < self.max_upload_bytes:
            raise ConfigError(
                [("PROXY_SPOOL_BUDGET_BYTES", "must be at least PROXY_MAX_UPLOAD_BYTES")]
            )
        return self

    @property
    def response_cache_redis_url(self) -> str:
        return self.cache_redis_url or with_database(self.redis_url, 1)

    # The voice session policy (shared.voicepolicy); a policy file may replace it.
    voice_live_models: CommaList = Field(
        default_factory=lambda: list(DEFAULT_LIVE_MODELS), validation_alias="VOICE_LIVE_MODELS"
    )
    """GPT-Live models a browser may ask for; the first is the default."""
    voice_realtime_models: CommaList = Field(
        default_factory=lambda: list(DEFAULT_REALTIME_MODELS),
        validation_alias="VOICE_REALTIME_MODELS",
    )
    """Realtime models a browser may ask for; the first is the default."""
    voice_voices: CommaList = Field(
        default_factory=lambda: list(DEFAULT_VOICES), validation_alias="VOICE_VOICES"
    )
    """Voices a browser may choose; the first is the default."""
    voice_instructions: str = Field(
        default="You are a helpful voice assistant.",
        max_length=8192,
        validation_alias="VOICE_INSTRUCTIONS",
    )
    """Instructions the proxy pins on every brokered voice session."""
    voice_client_instructions: bool = Field(
        default=False, validation_alias="VOICE_CLIENT_INSTRUCTIONS"
    )
    """Whether a browser may send its own instructions (else only VOICE_INSTRUCTIONS)."""
    voice_tools: CommaList = Field(default_factory=list, validation_alias="VOICE_TOOLS")
    """Tool names a voice session may declare; empty allows none."""
    voice_max_session_s: int = Field(
        default=900, ge=5, le=4 * 3600, validation_alias="VOICE_MAX_SESSION_S"
    )
    """Longest a brokered voice session may run; the sideband ends it then."""
    voice_on_violation: Literal["revert", "close"] = Field(
        default="revert", validation_alias="VOICE_ON_VIOLATION"
    )
    """What the sideband does when a session leaves the policy: revert it, or close it."""
    voice_max_sdp_bytes: int = Field(
        default=32 * 1024, ge=1024, le=256 * 1024, validation_alias="VOICE_MAX_SDP_BYTES"
    )
    """Largest SDP offer accepted from a browser."""
    voice_browser_events: CommaList | None = Field(
        default=None, validation_alias="VOICE_BROWSER_EVENTS"
    )
    """Server events the browser's data channel may receive (unset: the provider's default)."""
    voice_upstream_timeout_s: float = Field(
        default=10.0, gt=0, le=60, validation_alias="VOICE_UPSTREAM_TIMEOUT_S"
    )
    """Seconds the provider has to answer a session set-up (then 504)."""
    # A sideband's owner lease: another replica takes a session over this long after
    # its owner died (plus one scan, 1 s).
    voice_lease_ms: int = Field(
        default=4000, ge=1000, le=8000, validation_alias="VOICE_SIDEBAND_LEASE_MS"
    )
    """How long a replica's claim on a sideband lasts without renewal; another replica
    re-attaches an orphaned session after it lapses."""
    voice_budget_ahead_s: int = Field(
        default=5, ge=1, le=3600, validation_alias="VOICE_BUDGET_AHEAD_S"
    )
    """Billable seconds a GPT-Live session holds in its budgets beyond what it used (at
    least two of its usage reports; also what a new session must find left, else 429)."""
    voice_budget_ahead_tokens: int = Field(
        default=4000, ge=1, le=1_000_000, validation_alias="VOICE_BUDGET_AHEAD_TOKENS"
    )
    """Tokens a Realtime call holds in its budgets beyond what it used (at least two of
    its largest responses; also what a new call must find left, else 429)."""

    _split_voice = field_validator(
        "voice_live_models",
        "voice_realtime_models",
        "voice_voices",
        "voice_tools",
        "voice_browser_events",
        mode="before",
    )(split_commas)

    @field_validator("voice_live_models", "voice_realtime_models", "voice_voices")
    @classmethod
    def _voice_not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one allowed value")
        return value

    def voice_policy(self) -> VoicePolicy:
        return VoicePolicy(
            live_models=self.voice_live_models,
            realtime_models=self.voice_realtime_models,
            voices=self.voice_voices,
            instructions=self.voice_instructions,
            client_instructions=self.voice_client_instructions,
            tools=self.voice_tools,
            max_session_s=self.voice_max_session_s,
            on_violation=self.voice_on_violation,
            max_sdp_bytes=self.voice_max_sdp_bytes,
            browser_events=self.voice_browser_events,
        )


def with_database(url: str, db: int) -> str:
    """`url` (redis://, rediss://, unix://) pointing at logical database `db`."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "db"]
    if parts.scheme == "unix":
        # Built by hand: urlunsplit would drop the empty authority ("unix:/path").
        return f"unix://{parts.netloc}{parts.path}?{urlencode([*query, ('db', str(db))])}"
    return urlunsplit(parts._replace(path=f"/{db}", query=urlencode(query)))
