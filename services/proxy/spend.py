"""Budgets at the proxy: an estimate reserved before forwarding, settled when it ends.

Only the text endpoints (chat completions, Responses) are budgeted: their cost is
bounded before the call by the body's size (input tokens are at most its bytes) and the
output cap (the request's max tokens, else the policy's, else `_DEFAULT_OUTPUT_CAP`).
A call that ends without reported usage is settled with nothing when the provider
never answered (refused, errored, a 4xx), and with its whole estimate when the answer
was cut (client gone, stream broken) or came without a usage report: the provider bills
what it generated.
"""

from __future__ import annotations

import logging

from shared.budgets import BudgetExceeded, Budgets, BudgetUnavailable, Estimate, Hold
from shared.errors import BudgetExceededError, UnavailableError
from shared.metering import Priced
from shared.pricing import PriceTable, Usage
from shared.ratelimit import RedisUnavailableError
from shared.tokens import ProxyClaims

from .bodies import JsonBody
from .routes import Route

__all__ = ["SpendGuard"]

log = logging.getLogger(__name__)

_BUDGETED = frozenset({"chat_completions", "responses"})
_OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_DEFAULT_OUTPUT_CAP = 16_384
_CUT = frozenset({499, 502})


def _subjects(claims: ProxyClaims) -> list[tuple[str, str]]:
    out = [("token", claims.jti), ("global", "all")]
    if claims.sub:
        out.append(("user", claims.sub))
    if claims.app:
        out.append(("app", claims.app))
    return out


class SpendGuard:
    def __init__(self, budgets: Budgets, prices: PriceTable) -> None:
        self._budgets = budgets
        self._prices = prices

    def estimate(self, body: JsonBody, policy_cap: int | None) -> Estimate:
        cap = next(
            (
                v
                for f in _OUTPUT_FIELDS
                if isinstance(v := body.payload.get(f), int) and not isinstance(v, bool)
            ),
            policy_cap or _DEFAULT_OUTPUT_CAP,
        )
        worst = Usage(input_tokens=len(body.raw), output_tokens=max(cap, 0))
        return Estimate(worst.total_tokens, self._prices.cost(body.model, worst) or 0)

    async def reserve(
        self, route: Route, claims: ProxyClaims, body: JsonBody, policy_cap: int | None
    ) -> Hold | None:
        if route.endpoint not in _BUDGETED:
            return None
        try:
            return await self._budgets.reserve(
                subjects=_subjects(claims), estimate=self.estimate(body, policy_cap)
            )
        except BudgetExceeded as exc:
            raise BudgetExceededError(
                f"the {exc.name} budget is spent", code="budget_exceeded", headers=exc.headers()
            ) from None
        except BudgetUnavailable:
            raise UnavailableError(
                "budgets cannot be checked; try again",
                code="budget_unavailable",
                headers={"Retry-After": "1"},
            ) from None

    @staticmethod
    def charge(hold: Hold, status: int, priced: Priced | None, *, relayed: bool) -> tuple[int, int]:
        """(tokens, micros) to settle `hold` with; `relayed`: an answer was being sent."""
        if priced is not None:
            return priced.usage.total_tokens, priced.cost_micros or 0
        if relayed and (status in _CUT or 200 <= status < 300):
            # Answered (or cut mid-answer) without a usage report: the provider billed
            # something nobody told us about, so the whole estimate stays counted.
            return hold.estimate.tokens, hold.estimate.micros
        return 0, 0

    async def settle(
        self, hold: Hold, status: int, priced: Priced | None, *, relayed: bool
    ) -> None:
        tokens, micros = self.charge(hold, status, priced, relayed=relayed)
        try:
            await self._budgets.settle(hold, tokens=tokens, micros=micros)
        except RedisUnavailableError as exc:
            # The reservation lapses by its TTL; the real usage is not counted.
            log.error("budget not settled, redis unavailable (%s): %d micros", exc, micros)
