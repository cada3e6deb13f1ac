"""The voice session broker: an SDP offer in, the session built from policy, an answer out.

`ProxyHandler` has already checked the route, token, `voice` scope, origin, signature
and admission (the same checks and the same Redis round trip as every proxy call);
the broker reads the body against its digest, builds the upstream session from the
policy, checks the offer, and only then calls the provider with the leased key:

    POST <base>/live/sessions     JSON {session, transport: {type: webrtc, sdp}}
                                  -> 201 {session: {id}, transport: {type, sdp}}
    POST <base>/realtime/calls    multipart/form-data: sdp + session (JSON)
                                  -> 201 application/sdp, Location: .../calls/<id>

These are a few calls per session, not the hot path: httpx, one pooled client.
Refusals before the provider are 4xx; the provider refusing is 502, too slow 504.
The answer carries only the session id and the SDP answer.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import httpx
import orjson
from python_multipart.multipart import parse_options_header

from shared.errors import (
    BadRequestError,
    PayloadTooLargeError,
    UnavailableError,
    UpstreamError,
    UpstreamTimeoutError,
)
from shared.signing import ExpectedDigest
from shared.tokens import ProxyClaims
from shared.voicepolicy import VoiceApi, VoicePolicy, build_session
from shared.voicesessions import VoiceSession

from ..bodies import PartReader, UnsupportedMediaTypeError, read_json
from ..routes import PREFIX, Route
from ..upstream import KeySource
from .budget import VoiceBudget
from .metrics import SETUP_LATENCY
from .sdp import check_answer, check_offer
from .sessions import VoiceSessions
from .sideband import upstream_url

__all__ = ["CALL_ID_HEADER", "VOICE_API", "VoiceAnswer", "VoiceBroker"]

log = logging.getLogger(__name__)

CALL_ID_HEADER = "x-keyveil-call-id"
# Route endpoint label -> which voice API it brokers.
VOICE_API = {"voice_live": VoiceApi.live, "voice_calls": VoiceApi.realtime}
# Provider session ids go into URL paths: only plain, bounded ids are accepted.
_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_BODY_SLACK = 64 * 1024  # room for the session JSON and framing beside the SDP


@dataclass(frozen=True)
class VoiceAnswer:
    status: int
    headers: dict[str, str]
    body: bytes
    model: str
    upstream_s: float


async def _read_capped(
    chunks: AsyncIterator[bytes], *, content_length: str | None, digest: ExpectedDigest, limit: int
) -> bytes:
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise PayloadTooLargeError(f"body exceeds {limit} bytes")
    hasher = digest.new_hasher()
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"body exceeds {limit} bytes")
        hasher.update(chunk)
        parts.append(chunk)
    digest.check(hasher.digest())
    return b"".join(parts)


class _Form(PartReader):
    """The named parts of a small multipart body (sdp, session); nothing else allowed."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: dict[str, bytearray] = {}
        self._current: bytearray | None = None

    def part_begins(self) -> None:
        self._current = None

    def part_named(self, options: dict[bytes, bytes]) -> None:
        name = options.get(b"name", b"").decode("latin-1")
        if name not in ("sdp", "session"):
            raise BadRequestError(
                f"form field {name[:32]!r} is not allowed", code="field_not_allowed"
            )
        if name in self.parts:
            raise BadRequestError(f"form field {name!r} is repeated", code="invalid_multipart")
        self._current = self.parts[name] = bytearray()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current is not None:
            self._current += data[start:end]


def _parse_form(raw: bytes, content_type: str) -> dict[str, bytes]:
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise UnsupportedMediaTypeError("multipart/form-data needs a boundary")
    form = _Form()
    parser = form.parser(boundary)
    try:
        parser.write(raw)
        parser.finalize()
    except BadRequestError:
        raise
    except Exception:  # python-multipart raises its own and ValueErrors
        raise BadRequestError("malformed multipart body", code="invalid_multipart") from None
    return {name: bytes(value) for name, value in form.parts.items()}


def _only(mapping: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(k for k in mapping if k not in allowed)
    if unknown:
        raise BadRequestError(f"{where}{unknown[0][:64]} is not allowed", code="field_not_allowed")


class VoiceBroker:
    """Brokers GPT-Live sessions and Realtime calls; one per proxy process."""

    def __init__(
        self,
        *,
        base_url: str,
        policy: VoicePolicy,
        keys: KeySource,
        http: httpx.AsyncClient,
        sessions: VoiceSessions,
        budget: VoiceBudget | None = None,
    ) -> None:
        self._base_url = base_url
        self._budget = budget
        self._policy = policy
        self._keys = keys
        self._http = http
        self._sessions = sessions

    async def let_go(self) -> None:
        """Hand every sideband this replica holds over to the others (shutdown)."""
        await self._sessions.aclose()

    async def open(
        self,
        *,
        route: Route,
        claims: ProxyClaims,
        headers: Mapping[str, str],
        body: AsyncIterator[bytes],
        digest: ExpectedDigest,
    ) -> VoiceAnswer:
        started = perf_counter()
        api = VOICE_API[route.endpoint]
        limit = self._policy.max_sdp_bytes + _BODY_SLACK
        if api is VoiceApi.live:
            payload = await read_json(
                body,
                content_type=headers.get("content-type"),
                content_length=headers.get("content-length"),
                digest=digest,
                limit=limit,
            )
            session, offer = self._live_request(payload.payload)
        else:
            raw = await _read_capped(
                body, content_length=headers.get("content-length"), digest=digest, limit=limit
            )
            session, offer = self._call_request(raw, headers.get("content-type") or "")
        hold: str | None = None
        if self._budget is not None:  # refused here, before the provider, when spent
            hold = await self._budget.open(
                api=api,
                model=session["model"],
                token_id=claims.jti,
                user=claims.sub,
                app=claims.app,
            )
        upstream_started = perf_counter()
        try:
            if api is VoiceApi.live:
                session_id, answer = await self._create_live(session, offer)
            else:
                session_id, answer = await self._create_call(session, offer)
        except BaseException:
            await self._drop_hold(hold, api, claims)
            raise
        upstream_s = perf_counter() - upstream_started
        now = time.time()
        record = VoiceSession(
            id=session_id,
            api=api.value,
            token_id=claims.jti,
            token_session=claims.sid,
            user=claims.sub,
            app=claims.app,
            model=session["model"],
            voice=session["audio"]["output"]["voice"],
            started_at=now,
            ends_at=now + self._policy.max_session_s,
            pinned=session,
            budget_hold=hold,
        )
        try:
            await self._sessions.register(record)
        except Exception as exc:  # no registry: the session must not run unwatched
            log.error("voice registry unavailable (%s); ending the session", type(exc).__name__)
            await self._abandon(api, session_id)
            await self._drop_hold(hold, api, claims)
            raise UnavailableError(
                "voice sessions are unavailable; try again", code="voice_unavailable"
            ) from None
        SETUP_LATENCY.labels(api.value).observe(perf_counter() - started)
        if api is VoiceApi.live:
            out = orjson.dumps(
                {"session": {"id": session_id}, "transport": {"type": "webrtc", "sdp": answer}}
            )
            return VoiceAnswer(
                201, {"content-type": "application/json"}, out, record.model, upstream_s
            )
        location = f"{PREFIX}realtime/calls/{session_id}"
        reply_headers = {
            "content-type": "application/sdp",
            "location": location,
            CALL_ID_HEADER: session_id,
        }
        return VoiceAnswer(201, reply_headers, answer.encode(), record.model, upstream_s)

    # -- requests --------------------------------------------------------------------

    def _live_request(self, payload: dict[str, Any]) -> tuple[dict[str, Any], str]:
        _only(payload, {"session", "transport"}, "")
        transport = payload.get("transport")
        if not isinstance(transport, dict):
            raise BadRequestError("transport must be an object", code="sdp_invalid")
        _only(transport, {"type", "sdp"}, "transport.")
        if transport.get("type") != "webrtc":
            raise BadRequestError("transport.type must be webrtc", code="transport_invalid")
        requested = payload.get("session")
        if requested is not None and not isinstance(requested, dict):
            raise BadRequestError("session must be an object", code="session_invalid")
        session = build_session(requested, self._policy, VoiceApi.live)
        offer = check_offer(transport.get("sdp"), max_bytes=self._policy.max_sdp_bytes)
        return session, offer

    def _call_request(self, raw: bytes, content_type: str) -> tuple[dict[str, Any], str]:
        kind, _ = parse_options_header(content_type)
        requested: Any = None
        if kind == b"application/sdp":
            sdp_bytes = raw
        elif kind == b"multipart/form-data":
            parts = _parse_form(raw, content_type)
            if "sdp" not in parts:
                raise BadRequestError("the form needs an sdp field", code="sdp_invalid")
            sdp_bytes = parts["sdp"]
            if "session" in parts:
                try:
                    requested = orjson.loads(parts["session"])
                except orjson.JSONDecodeError:
                    raise BadRequestError("session must be JSON", code="session_invalid") from None
                if not isinstance(requested, dict):
                    raise BadRequestError("session must be an object", code="session_invalid")
        else:
            raise UnsupportedMediaTypeError(
                "Content-Type must be multipart/form-data (sdp, session) or application/sdp"
            )
        if len(sdp_bytes) > self._policy.max_sdp_bytes:
            raise BadRequestError(
                f"the SDP offer exceeds {self._policy.max_sdp_bytes} bytes", code="sdp_too_large"
            )
        try:
            sdp = sdp_bytes.decode()
        except UnicodeDecodeError:
            raise BadRequestError("the SDP offer is not UTF-8", code="sdp_invalid") from None
        session = build_session(requested, self._policy, VoiceApi.realtime)
        return session, check_offer(sdp, max_bytes=self._policy.max_sdp_bytes)

    # -- the provider ----------------------------------------------------------------

    async def _post(self, suffix: str, **kw: Any) -> tuple[httpx.Response, str]:
        authorization, _ = await self._keys.authorization()
        key = authorization.partition(" ")[2]
        headers = {"Authorization": authorization, **kw.pop("headers", {})}
        try:
            answer = await self._http.post(
                upstream_url(self._base_url, suffix), headers=headers, **kw
            )
        except httpx.TimeoutException:
            raise UpstreamTimeoutError(
                "the provider did not answer in time", code="upstream_timeout"
            ) from None
        except httpx.HTTPError as exc:
            log.warning("voice upstream unreachable (%s)", type(exc).__name__)
            raise UpstreamError(
                "the provider is unreachable", code="upstream_unreachable"
            ) from None
        finally:
            del authorization, headers
        if answer.status_code != 201 and answer.status_code != 200:
            log.warning("voice upstream refused with %d", answer.status_code)
            code = {401: "upstream_auth_failed", 403: "upstream_auth_failed"}.get(
                answer.status_code,
                "upstream_rate_limited" if answer.status_code == 429 else "upstream_refused",
            )
            raise UpstreamError(f"the provider answered {answer.status_code}", code=code)
        return answer, key

    def _malformed(self) -> UpstreamError:
        return UpstreamError(
            "the provider answered in an unexpected shape", code="upstream_malformed"
        )

    def _clean(self, answer_sdp: object, key: str) -> str:
        try:
            sdp = check_answer(answer_sdp, max_bytes=self._policy.max_sdp_bytes)
        except ValueError:
            raise self._malformed() from None
        if key and key in sdp:  # never, but the key must not reach a browser even then
            raise self._malformed()
        return sdp

    async def _create_live(self, session: dict[str, Any], offer: str) -> tuple[str, str]:
        answer, key = await self._post(
            "/live/sessions",
            json={"session": session, "transport": {"type": "webrtc", "sdp": offer}},
        )
        try:
            payload = answer.json()
            session_id = payload["session"]["id"]
            answer_sdp = payload["transport"]["sdp"]
        except (ValueError, KeyError, TypeError):
            raise self._malformed() from None
        if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
            raise self._malformed()
        return session_id, self._clean(answer_sdp, key)

    async def _create_call(self, session: dict[str, Any], offer: str) -> tuple[str, str]:
        answer, key = await self._post(
            "/realtime/calls",
            files={
                "sdp": (None, offer.encode(), "application/sdp"),
                "session": (None, orjson.dumps(session), "application/json"),
            },
            headers={"Accept": "application/sdp"},
        )
        location = answer.headers.get("location", "")
        call_id = location.rstrip("/").rsplit("/", 1)[-1]
        if not _SESSION_ID.fullmatch(call_id):
            raise self._malformed()
        return call_id, self._clean(answer.text, key)

    async def _drop_hold(self, hold: str | None, api: VoiceApi, claims: ProxyClaims) -> None:
        """A session that was not brokered gives its budget hold back (best effort)."""
        if hold is None or self._budget is None:
            return
        try:
            await self._budget.abandon(
                hold, api=api, token_id=claims.jti, user=claims.sub, app=claims.app
            )
        except Exception as exc:  # it lapses by its TTL
            log.warning("voice budget hold not released (%s)", type(exc).__name__)

    async def _abandon(self, api: VoiceApi, session_id: str) -> None:
        """End a session upstream that keyveil could not register (best effort)."""
        suffix = (
            f"/realtime/calls/{session_id}/hangup"
            if api is VoiceApi.realtime
            else f"/live/sessions/{session_id}/hangup"
        )
        try:
            await self._post(suffix)
        except Exception as exc:  # best effort: the provider's own expiry still applies
            log.warning("could not end an unregistered voice session (%s)", type(exc).__name__)
