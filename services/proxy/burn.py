"""How full each kind of budget is, as a gauge for the dashboard and the near-limit alert.

`keyveil_budget_burn_ratio{scope, unit, window}` is the fullest configured budget of that
kind: (committed + held) / limit, read from Redis every `BUDGET_BURN_INTERVAL_S` by each
replica (they all export the same figure: aggregate with max). Labels are the budget's
kind, never its subject (a user hash or token id would be unbounded). A default budget
(subject `*`) is not read: its subjects' counters are not listed anywhere but in the
keyspace, and scanning that on a timer would cost more than the check it reports on.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Gauge

from shared.budgets import BudgetAdmin, BudgetState
from shared.ratelimit import RedisUnavailableError, redis_unavailable

__all__ = ["BURN", "BurnReporter", "fullest"]

log = logging.getLogger(__name__)

BURN = Gauge(
    "keyveil_budget_burn_ratio",
    "The fullest configured budget of a kind: (committed + held) / limit",
    ["scope", "unit", "window"],
)


def fullest(states: list[BudgetState]) -> dict[tuple[str, str, str], float]:
    """The highest burn per (scope, unit, window) among budgets with a subject of their own."""
    out: dict[tuple[str, str, str], float] = {}
    for state in states:
        if state.subject == "*":
            continue
        ratio = (state.used + state.held) / state.limit if state.limit > 0 else 1.0
        kind = (state.scope, state.unit, state.window)
        out[kind] = max(out.get(kind, 0.0), ratio)
    return out


class BurnReporter:
    """Sets `BURN` from `BudgetAdmin.show()` on a timer; kinds no longer configured go."""

    def __init__(self, admin: BudgetAdmin, *, interval_s: float) -> None:
        self._admin = admin
        self._interval_s = interval_s
        self._shown: set[tuple[str, str, str]] = set()

    async def report(self) -> None:
        """One reading; Redis away leaves the last figures (and is logged once a pass)."""
        try:
            with redis_unavailable():
                burns = fullest(await self._admin.show())
        except RedisUnavailableError as exc:
            log.warning("budget burn not read, redis unavailable (%s)", exc)
            return
        for kind in self._shown - burns.keys():
            BURN.remove(*kind)
        for kind, ratio in burns.items():
            BURN.labels(*kind).set(ratio)
        self._shown = set(burns)

    async def run(self) -> None:
        """Report until cancelled (the service runtime cancels it at stop)."""
        while True:
            try:
                await self.report()
            except Exception:  # a malformed budget must not end the reporting for good
                log.exception("budget burn not read")
            await asyncio.sleep(self._interval_s)
