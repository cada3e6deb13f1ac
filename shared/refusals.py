"""Usage events for refusals nobody authenticated: sampled, and every one counted.

A refusal before a token was verified (no token, a forged or expired one, a path or
method that does not exist) costs a client nothing, so one event per refusal would
let anyone fill the usage stream. `RefusalSampler` sends the first refusal of each
(reason, client IP) at once, sums the ones after it, and sends the sum at the end of
each interval as one event whose `count` says how many it stands for. Past `max_keys`
distinct keys in one interval, further clients share one key per reason (client IP
unset). Metrics still count every refusal; authenticated refusals are not sampled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from shared.events import UsageEvent
from shared.eventschema import Reason

__all__ = ["RefusalSampler"]

_Key = tuple[Reason | None, str | None]


@dataclass
class _Pending:
    count: int = 0
    last: UsageEvent | None = None


class RefusalSampler:
    """At most one event per (reason, client IP) per `interval_s`, with a `count`."""

    def __init__(
        self,
        emit: Callable[[UsageEvent], None],
        *,
        interval_s: float = 1.0,
        max_keys: int = 32,
    ) -> None:
        self._emit = emit
        self._interval_s = interval_s
        self._max_keys = max_keys
        self._window: dict[_Key, _Pending] = {}
        self._timer: asyncio.TimerHandle | None = None

    def refused(self, event: UsageEvent) -> None:
        key: _Key = (event.reason, event.client_ip)
        pending = self._window.get(key)
        if pending is None and len(self._window) >= self._max_keys:
            key = (event.reason, None)
            event = event.model_copy(update={"client_ip": None})
            pending = self._window.get(key)
        if pending is None:
            self._window[key] = _Pending()
            self._emit(event.model_copy(update={"count": 1}))
            self._arm()
            return
        pending.count += 1
        pending.last = event

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval_s, self.flush)

    def flush(self, *, final: bool = False) -> None:
        """Send the sums of the interval; keys that had some stay quiet one more interval."""
        self._timer = None
        window, self._window = self._window, {}
        for key, pending in window.items():
            if pending.count and pending.last is not None:
                self._emit(pending.last.model_copy(update={"count": pending.count}))
                if not final:
                    self._window[key] = _Pending()
        if self._window:
            self._arm()

    def close(self) -> None:
        """Send what is pending now (at shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush(final=True)
