"""Budgets for brokered voice sessions: a rolling hold ahead of the usage, charged per tick.

A voice session cannot be bounded before it starts (GPT-Live bills seconds, Realtime
bills tokens per response, until someone ends the session), so it holds `ahead` in
every budget that applies (shared.budgets `_VOICE_LUA`): what it may still use before
the next report and its close. At the open the whole hold must fit (else 429
`budget_exceeded` before the provider is called); every report adds the real usage and
tops the hold up from the room left; when it cannot be topped up the session is ended,
and what it still holds covers the last report. So N concurrent sessions never hold
more than the budget between them, and the committed spend stays within the budget
unless a report is larger than a hold (a long sideband gap).

Units: GPT-Live is charged in seconds and micro-dollars, Realtime in tokens and
micro-dollars; seconds are counted whole, rounded up on the session's cumulative total
(the provider bills per started second).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

from shared.budgets import BudgetExceeded, Budgets, Metered, VoiceCharge
from shared.pricing import PriceTable, Usage
from shared.ratelimit import RedisUnavailableError
from shared.voicepolicy import VoiceApi
from shared.voicesessions import VoiceSession

from ..spend import budget_spent, budgets_unavailable

__all__ = ["VoiceBudget", "subjects_of", "whole_seconds"]

# A hold outlives a dead replica's lease and the takeover (lease + scan + re-attach)
# and the gap between two usage reports; a live sideband refreshes it on every report,
# an ended session drops it.
_HOLD_TTL_S = 300.0


def subjects_of(token_id: str, user: str | None, app: str | None) -> list[tuple[str, str]]:
    out = [("token", token_id), ("global", "all")]
    if user:
        out.append(("user", user))
    if app:
        out.append(("app", app))
    return out


def whole_seconds(before: float, total: float) -> int:
    """Whole seconds a cumulative report adds (rounded up on the running total)."""
    return max(0, math.ceil(total - 1e-9) - math.ceil(before - 1e-9))


@dataclass
class _Largest:
    """The largest single report a session has made, per unit (the hold covers two)."""

    seconds: int = 0
    tokens: int = 0
    micros: int = 0


class VoiceBudget:
    """One per replica: opens, charges and releases voice sessions' holds."""

    def __init__(
        self,
        budgets: Budgets,
        prices: PriceTable | None,
        *,
        ahead_s: int,
        ahead_tokens: int,
        max_session_s: int,
    ) -> None:
        self._budgets = budgets
        self._prices = prices
        self._ahead_s = max(1, min(ahead_s, max_session_s))
        self._ahead_tokens = max(1, ahead_tokens)
        self._max_session_s = max_session_s
        self._largest: dict[str, _Largest] = {}

    def ahead(self, api: VoiceApi, model: str, hold_id: str | None = None) -> Metered:
        """What a session holds beyond its usage: the configured amount, or two of its
        largest reports when that is more (seconds capped at the session's max length)."""
        seen = self._largest.get(hold_id or "", _Largest())
        if api is VoiceApi.live:
            seconds = min(max(self._ahead_s, 2 * seen.seconds), self._max_session_s)
            micros = self._cost(model, Usage(seconds=seconds))
            return Metered(micros=max(micros, 2 * seen.micros), seconds=seconds)
        tokens = max(self._ahead_tokens, 2 * seen.tokens)
        micros = self._cost(model, Usage(output_tokens=tokens, audio_output_tokens=tokens))
        return Metered(tokens=tokens, micros=max(micros, 2 * seen.micros))

    def _cost(self, model: str, usage: Usage) -> int:
        return (self._prices.cost(model, usage) or 0) if self._prices is not None else 0

    async def open(
        self, *, api: VoiceApi, model: str, token_id: str, user: str | None, app: str | None
    ) -> str:
        """Hold `ahead` for a session about to be brokered: its hold id. Raises the
        429 (budget spent) or 503 (Redis away and KEYVEIL_BUDGET_FAILURE_MODE closed)."""
        hold_id = f"voice-{secrets.token_hex(8)}"
        try:
            await self._budgets.voice(
                hold_id=hold_id,
                subjects=subjects_of(token_id, user, app),
                mode="open",
                ahead=self.ahead(api, model),
                used=self._units(api),
                ttl_s=_HOLD_TTL_S,
            )
        except BudgetExceeded as exc:
            raise budget_spent(exc) from None
        except RedisUnavailableError:
            if self._budgets.failure_mode == "open":
                return hold_id  # uncounted until Redis is back (its ticks then charge)
            raise budgets_unavailable() from None
        return hold_id

    @staticmethod
    def _units(api: VoiceApi) -> Metered:
        """Zero usage in the units this API bills (so only their budgets apply)."""
        return Metered(micros=0, seconds=0) if api is VoiceApi.live else Metered(tokens=0, micros=0)

    async def charge(
        self,
        record: VoiceSession,
        *,
        event_id: str,
        seconds: int = 0,
        tokens: int = 0,
        micros: int = 0,
    ) -> VoiceCharge | None:
        """Add one report's usage (once per event id: a replayed outbox event is not
        counted twice) and top the hold up. Raises RedisUnavailableError."""
        api = VoiceApi(record.api)
        if api is VoiceApi.live:
            used = Metered(micros=micros, seconds=seconds)
        else:
            used = Metered(tokens=tokens, micros=micros)
        hold_id = self.hold_id(record)
        seen = self._largest.setdefault(hold_id, _Largest())
        seen.seconds = max(seen.seconds, seconds)
        seen.tokens = max(seen.tokens, tokens)
        seen.micros = max(seen.micros, micros)
        return await self._budgets.voice(
            hold_id=hold_id,
            subjects=subjects_of(record.token_id, record.user, record.app),
            mode="tick",
            used=used,
            ahead=self.ahead(api, record.model, hold_id),
            event_id=event_id,
            ttl_s=_HOLD_TTL_S,
        )

    @staticmethod
    def hold_id(record: VoiceSession) -> str:
        """The session's hold id, the same on every replica (kept in its record)."""
        return record.budget_hold or f"voice-{record.id}"

    async def release(self, record: VoiceSession) -> None:
        """The session ended: drop what it still holds."""
        hold_id = self.hold_id(record)
        self._largest.pop(hold_id, None)
        await self._budgets.voice(
            hold_id=hold_id,
            subjects=subjects_of(record.token_id, record.user, record.app),
            mode="release",
            used=self._units(VoiceApi(record.api)),
        )

    def forget(self, record: VoiceSession) -> None:
        """This replica let go of the session (another one charges it now)."""
        self._largest.pop(self.hold_id(record), None)

    async def abandon(
        self, hold_id: str, *, api: VoiceApi, token_id: str, user: str | None, app: str | None
    ) -> None:
        """The session was never brokered: drop its hold (best effort; it lapses anyway)."""
        await self._budgets.voice(
            hold_id=hold_id,
            subjects=subjects_of(token_id, user, app),
            mode="release",
            used=self._units(api),
        )
