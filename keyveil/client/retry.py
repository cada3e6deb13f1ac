"""When to try a request again: exponential backoff with full jitter, honouring Retry-After.

Only answers that prove the request was not acted on are retried: 429 and 503 (the
service or provider refused it), and failures to connect (nothing was sent). A call
that was sent and then lost (read timeout, dropped connection, 502/504) is never
retried blindly: the provider may have processed it.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass, field

__all__ = ["RetryPolicy", "parse_retry_after"]


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or an HTTP-date)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts, how long between them, and which statuses qualify."""

    max_attempts: int = 4
    base_delay_s: float = 0.25
    max_delay_s: float = 8.0
    # A server asking for a longer wait than this gets an error, not a sleeping client.
    max_retry_after_s: float = 60.0
    retry_statuses: frozenset[int] = field(default_factory=lambda: frozenset({429, 503}))

    def backoff_s(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**attempt)] (attempt counts from 0)."""
        ceiling = min(self.max_delay_s, self.base_delay_s * (2**attempt))
        return rng.uniform(0.0, ceiling)

    def delay_s(
        self, attempt: int, retry_after_s: float | None, rng: random.Random
    ) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None to give up."""
        if attempt + 1 >= self.max_attempts:
            return None
        jitter = self.backoff_s(attempt, rng)
        if retry_after_s is None:
            return jitter
        if retry_after_s > self.max_retry_after_s:
            return None
        # Never earlier than the server asked; spread retries of many clients a little.
        return retry_after_s + min(jitter, self.base_delay_s)
