"""The usage policy: which models each endpoint and tier may use, and the caps on a request.

One TOML file (KEYVEIL_POLICY_FILE), validated at start with errors naming the field;
without one, `default_policy()` applies. The proxy (services/proxy/policy.py) and the
token service's realtime mint path (services/token/realtime.py) read the same object.

    version = 1
    [endpoints.chat]
    models = ["gpt-4o-mini", "gpt-4o"]     # "*" allows any model
    max_tokens = 2048                      # also caps max_completion_tokens
    over_cap = "clamp"                     # or "reject" (400 naming the limit)
    max_n = 1
    [endpoints.speech]
    max_input_chars = 4096
    [endpoints.realtime]
    voices = ["alloy", "verse"]
    instructions = "You are a helpful voice agent."   # the server's template
    client_instructions = "refuse"         # refuse | ignore | allow
    [tiers.pro.endpoints.chat]             # a tier overrides only the fields it names
    models = ["gpt-4o-mini", "gpt-4o", "gpt-4.1"]
    max_tokens = 8192
    [voice]                                # the voice broker's VoicePolicy (shared/voicepolicy.py)
    live_models = ["gpt-live-1"]
    max_session_s = 600

A `Policy` is immutable; `PolicyHolder` swaps in a new one atomically on SIGHUP or
when the file changes, and keeps the old one when the new file is invalid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import ConfigError
from shared.voicepolicy import VoicePolicy

__all__ = [
    "ANY_MODEL",
    "ENDPOINTS",
    "Endpoint",
    "EndpointRules",
    "Policy",
    "PolicyHolder",
    "default_policy",
    "endpoint_for",
    "load_policy",
    "parse_policy",
]

log = logging.getLogger(__name__)

Endpoint = Literal["chat", "speech", "transcription", "realtime", "live"]
ENDPOINTS: tuple[Endpoint, ...] = ("chat", "speech", "transcription", "realtime", "live")
ANY_MODEL = "*"
_VARIABLE = "KEYVEIL_POLICY_FILE"

RELOADS = Counter(
    "keyveil_policy_reloads_total",
    "Usage policy reloads (result: ok|invalid)",
    ["service", "result"],
)


class EndpointRules(BaseModel):
    """What one endpoint allows; None means no cap of that kind."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: tuple[str, ...] = Field(default=(ANY_MODEL,), min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    over_cap: Literal["reject", "clamp"] = "reject"
    max_n: int | None = Field(default=None, ge=1)
    max_input_bytes: int | None = Field(default=None, ge=1)
    max_input_chars: int | None = Field(default=None, ge=1)
    # Realtime and live sessions: the server's template and what a client may add.
    voices: tuple[str, ...] | None = Field(default=None, min_length=1)
    instructions: str | None = Field(default=None, max_length=20_000)
    client_instructions: Literal["refuse", "ignore", "allow"] = "refuse"

    def allows_model(self, model: str) -> bool:
        return ANY_MODEL in self.models or model in self.models

    @property
    def default_model(self) -> str | None:
        return next((m for m in self.models if m != ANY_MODEL), None)


class _TierSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoints: dict[Endpoint, EndpointRules] = Field(default_factory=dict)


class Policy(BaseModel):
    """The whole policy: base rules per endpoint, overrides per tier."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    endpoints: dict[Endpoint, EndpointRules] = Field(default_factory=dict)
    tiers: dict[str, _TierSection] = Field(default_factory=dict)
    # The voice broker's session template (shared/voicepolicy.py). None: the broker's
    # VOICE_* settings. Read when the proxy starts; a reload does not reach live brokers.
    voice: VoicePolicy | None = None

    @property
    def tier_names(self) -> frozenset[str]:
        return frozenset(self.tiers)

    def rules(self, endpoint: Endpoint, tier: str | None = None) -> EndpointRules:
        """The base rules of `endpoint` with `tier`'s overrides (unknown tiers get the base)."""
        base = self.endpoints.get(endpoint) or EndpointRules()
        section = self.tiers.get(tier) if tier else None
        override = section.endpoints.get(endpoint) if section else None
        if override is None:
            return base
        return base.model_copy(update={f: getattr(override, f) for f in override.model_fields_set})


DEFAULT_CHAT_MODELS = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1-nano",
    "gpt-4.1-mini",
    "gpt-4.1",
    "gpt-5-nano",
    "gpt-5-mini",
)
DEFAULT_SPEECH_MODELS = ("gpt-4o-mini-tts", "tts-1", "tts-1-hd")
DEFAULT_TRANSCRIPTION_MODELS = ("whisper-1", "gpt-4o-mini-transcribe", "gpt-4o-transcribe")
DEFAULT_REALTIME_MODELS = ("gpt-realtime", "gpt-realtime-mini")
DEFAULT_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse")


def default_policy(
    *,
    realtime_models: Sequence[str] = DEFAULT_REALTIME_MODELS,
    realtime_voices: Sequence[str] = DEFAULT_VOICES,
) -> Policy:
    """The built-in policy: common models, bounded output, no client instructions."""
    realtime = EndpointRules(models=tuple(realtime_models), voices=tuple(realtime_voices))
    return Policy(
        endpoints={
            "chat": EndpointRules(models=DEFAULT_CHAT_MODELS, max_tokens=4096, max_n=1),
            "speech": EndpointRules(models=DEFAULT_SPEECH_MODELS, max_input_chars=4096),
            "transcription": EndpointRules(models=DEFAULT_TRANSCRIPTION_MODELS),
            "realtime": realtime,
            "live": realtime,
        }
    )


def _field_errors(exc: ValidationError) -> list[tuple[str, str]]:
    return [
        (
            _VARIABLE,
            f"{'.'.join(str(p) for p in e['loc']) or 'policy'}: {e['msg']}",
        )
        for e in exc.errors(include_input=False, include_url=False)
    ]


def parse_policy(text: str, *, base: Policy | None = None) -> Policy:
    """A policy from TOML text; endpoints it leaves out keep `base`'s (the defaults)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([(_VARIABLE, f"not valid TOML ({exc})")]) from None
    try:
        policy = Policy.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_field_errors(exc)) from None
    fallback = base or default_policy()
    merged = {**fallback.endpoints, **policy.endpoints}
    return policy.model_copy(update={"endpoints": merged})


def load_policy(path: Path | None, *, base: Policy | None = None) -> Policy:
    """The policy in `path` (None: the built-in one); `ConfigError` naming the field."""
    fallback = base or default_policy()
    if path is None:
        return fallback
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([(_VARIABLE, f"cannot be read ({type(exc).__name__})")]) from None
    return parse_policy(text, base=fallback)


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class PolicyHolder:
    """The live policy: `current` is swapped whole, so a request sees one policy or the other."""

    def __init__(
        self,
        path: Path | None,
        *,
        service: str,
        base: Policy | None = None,
        poll_s: float = 1.0,
    ) -> None:
        self._path = path
        self._service = service
        self._base = base or default_policy()
        self._poll_s = poll_s
        self.current: Policy = load_policy(path, base=self._base)
        self._seen = _signature(path) if path else None
        self._task: asyncio.Task[None] | None = None
        self._sighup = False

    def reload(self) -> bool:
        """Read the file again; True when a new policy is in force."""
        if self._path is None:
            return False
        self._seen = _signature(self._path)
        try:
            policy = load_policy(self._path, base=self._base)
        except ConfigError as exc:
            RELOADS.labels(self._service, "invalid").inc()
            log.error("policy reload refused, keeping the previous policy: %s", exc)
            return False
        self.current = policy
        RELOADS.labels(self._service, "ok").inc()
        log.info("usage policy reloaded", extra={"fields": {"path": str(self._path)}})
        return True

    def start(self) -> None:
        """Reload on SIGHUP (main thread only) and when the file changes."""
        if self._path is None:
            return
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, self.reload)
            self._sighup = True
        self._task = loop.create_task(self._watch())

    async def stop(self) -> None:
        if self._sighup:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._sighup = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        assert self._path is not None
        while True:
            await asyncio.sleep(self._poll_s)
            if _signature(self._path) != self._seen:
                self.reload()


def endpoint_for(route_endpoint: str) -> Endpoint | None:
    """The policy endpoint of a proxy route's metric label."""
    return _ROUTE_ENDPOINTS.get(route_endpoint)


_ROUTE_ENDPOINTS: Mapping[str, Endpoint] = {
    "chat_completions": "chat",
    "responses": "chat",
    "audio_speech": "speech",
    "audio_transcriptions": "transcription",
}
