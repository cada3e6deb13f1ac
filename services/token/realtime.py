"""Realtime ephemeral client secrets, minted server side with a leased provider key.

The session sent upstream is built from the usage policy (model and voice allowlists,
the instructions template); a client may choose within them, never widen them. The
provider key lives only in the Authorization header of the one upstream request.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from services.token.models import SessionRequest
from shared.errors import BadRequestError, UpstreamError, UpstreamTimeoutError
from shared.leases import LeaseClient
from shared.policy import PolicyHolder

__all__ = ["RealtimeMinter", "SessionPolicy"]

log = logging.getLogger(__name__)

# Fields of the upstream session object a browser is shown; anything else is dropped.
_SESSION_FIELDS = ("type", "id", "object", "model", "instructions", "audio", "output_modalities")


class SessionPolicy:
    """The realtime session a client gets: the usage policy's template, the client's
    choices within its allowlists (shared/policy.py, endpoint `realtime`, per tier)."""

    def __init__(self, policy: PolicyHolder) -> None:
        self._policy = policy

    def resolve(self, wanted: SessionRequest, *, tier: str | None = None) -> dict[str, Any]:
        rules = self._policy.current.rules("realtime", tier)
        model = wanted.model or rules.default_model
        if model is None or not rules.allows_model(model):
            # 400 as before this policy existed (the proxy's model_not_allowed is a 403).
            raise BadRequestError("session.model is not allowed", code="model_not_allowed")
        voices = rules.voices or ()
        voice = wanted.voice or (voices[0] if voices else None)
        if voice is not None and voices and voice not in voices:
            raise BadRequestError("session.voice is not allowed", code="voice_not_allowed")
        session: dict[str, Any] = {"type": "realtime", "model": model}
        if voice is not None:
            session["audio"] = {"output": {"voice": voice}}
        instructions = rules.instructions
        if wanted.instructions:
            if rules.client_instructions == "refuse":
                raise BadRequestError(
                    "session.instructions are set by the server's policy",
                    code="instructions_not_allowed",
                )
            if rules.client_instructions == "allow":
                instructions = wanted.instructions
        if instructions:
            session["instructions"] = instructions
        return session


class RealtimeMinter:
    """Calls POST {OPENAI_BASE_URL}/realtime/client_secrets with a leased key."""

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        leases: LeaseClient,
        base_url: str,
        duration_s: int,
    ) -> None:
        self._http = http
        self._leases = leases
        self._url = f"{base_url.rstrip('/')}/realtime/client_secrets"
        self._duration_s = duration_s

    async def mint(self, session: dict[str, Any]) -> dict[str, Any]:
        """`{"mode": "realtime", "token", "expires_at", "session"}`; ApiError otherwise."""
        authorization, _lease = await self._leases.authorization()
        body = {
            "expires_after": {"anchor": "created_at", "seconds": self._duration_s},
            "session": session,
        }
        try:
            answer = await self._http.post(
                self._url, json=body, headers={"Authorization": authorization}
            )
        except httpx.TimeoutException:
            raise UpstreamTimeoutError(
                "the provider did not answer in time", code="upstream_timeout"
            ) from None
        except httpx.HTTPError as exc:
            log.warning("realtime upstream unreachable (%s)", type(exc).__name__)
            raise UpstreamError(
                "the provider is unreachable", code="upstream_unreachable"
            ) from None
        finally:
            del authorization
        if answer.status_code in (401, 403):
            # A key rotated or revoked under us: fetch a fresh lease next time.
            self._leases.invalidate()
        if answer.status_code >= 400:
            log.warning("realtime upstream refused with %d", answer.status_code)
            code = "upstream_rate_limited" if answer.status_code == 429 else "upstream_error"
            raise UpstreamError(f"the provider answered {answer.status_code}", code=code)
        try:
            payload = answer.json()
            token = payload["value"]
            expires_at = int(payload["expires_at"])
        except (ValueError, KeyError, TypeError):
            raise UpstreamError(
                "the provider answered in an unexpected shape", code="upstream_malformed"
            ) from None
        if not isinstance(token, str) or not token:
            raise UpstreamError(
                "the provider answered in an unexpected shape", code="upstream_malformed"
            )
        upstream_session = payload.get("session")
        shown = (
            {k: upstream_session[k] for k in _SESSION_FIELDS if k in upstream_session}
            if isinstance(upstream_session, dict)
            else session
        )
        return {"mode": "realtime", "token": token, "expires_at": expires_at, "session": shown}
