"""Bounded, event-time counters the detectors are built from.

Everything is keyed by event time (`ts` of the event), not by the wall clock, so a
backlog replayed after the auditor was down reaches the same verdicts it would have
reached live. Every per-key structure is an LRU capped at `max_keys`: an attacker
cycling through IPs or token ids costs memory we chose, not memory they chose.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Baseline", "BoundedMap", "Cooldown", "EwmaStats", "RatioWindow", "WindowCounter"]

V = TypeVar("V")


class BoundedMap(Generic[V]):
    """An LRU dict: touching a key makes it recent; the least recent falls out at `max_keys`."""

    def __init__(self, max_keys: int) -> None:
        self._items: OrderedDict[str, V] = OrderedDict()
        self._max = max_keys

    def get(self, key: str) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._max:
            self._items.popitem(last=False)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


class WindowCounter:
    """How many times each key was seen within the last `window_s`, up to `cap`.

    Only the newest `cap` timestamps per key are kept, which is all a threshold of
    `cap` needs: memory per key is O(cap) however hard the key is hammered.
    """

    def __init__(self, window_s: float, cap: int, max_keys: int) -> None:
        self.window_s = window_s
        self.cap = max(cap, 1)
        self._keys: BoundedMap[deque[float]] = BoundedMap(max_keys)

    def add(self, key: str, ts: float, weight: int = 1) -> int:
        """Record `weight` occurrences at `ts` (a sampled event stands for several);
        return the count within the window ending at `ts`."""
        times = self._keys.get(key)
        if times is None:
            times = deque(maxlen=self.cap)
            self._keys.put(key, times)
        times.extend([ts] * min(max(weight, 1), self.cap))
        horizon = ts - self.window_s
        return sum(1 for t in times if t > horizon)


class RatioWindow:
    """Share of bad outcomes over a sliding window, in one-second buckets."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._buckets: deque[list[int]] = deque()  # [second, total, bad]
        self.total = 0
        self.bad = 0

    def add(self, ts: float, *, bad: bool, weight: int = 1) -> float:
        """Record `weight` outcomes at `ts`; the bad share over the window."""
        weight = max(weight, 1)
        second = int(ts)
        if self._buckets and self._buckets[-1][0] >= second:
            bucket = self._buckets[-1]
        else:
            bucket = [second, 0, 0]
            self._buckets.append(bucket)
        bucket[1] += weight
        bucket[2] += weight * int(bad)
        self.total += weight
        self.bad += weight * int(bad)
        while self._buckets and self._buckets[0][0] <= second - self.window_s:
            _, total, old_bad = self._buckets.popleft()
            self.total -= total
            self.bad -= old_bad
        return self.bad / self.total if self.total else 0.0


@dataclass
class EwmaStats:
    """Exponentially weighted mean and variance of per-bucket counts."""

    alpha: float
    mean: float = 0.0
    var: float = 0.0
    samples: int = 0

    def fold(self, value: float) -> None:
        if self.samples == 0:
            self.mean = value
        else:
            diff = value - self.mean
            incr = self.alpha * diff
            self.mean += incr
            self.var = (1 - self.alpha) * (self.var + diff * incr)
        self.samples += 1

    @property
    def spread(self) -> float:
        # Counts are roughly Poisson: never trust a spread below sqrt(mean) (or 1), so a
        # perfectly flat warm-up does not make the first extra event look like 50 sigma.
        return max(math.sqrt(self.var), math.sqrt(max(self.mean, 0.0)), 1.0)


@dataclass
class Verdict:
    count: float
    z: float | None
    spike: bool


class Baseline:
    """A per-bucket count learned with an EWMA, judged with a z-score as the bucket fills.

    Cold start: until `warmup` buckets have been folded no z-score is computed; only an
    absolute `cold_ceiling` can fire. Spikes are winsorised before they are folded, so
    an attack does not teach the baseline that attacks are normal.
    """

    def __init__(
        self,
        *,
        bucket_s: float,
        alpha: float,
        warmup: int,
        z_threshold: float,
        min_count: float,
        cold_ceiling: float,
    ) -> None:
        self.bucket_s = bucket_s
        self.warmup = warmup
        self.z_threshold = z_threshold
        self.min_count = min_count
        self.cold_ceiling = cold_ceiling
        self.stats = EwmaStats(alpha)
        self._bucket: int | None = None
        self._count = 0.0

    def add(self, ts: float, amount: float = 1.0) -> Verdict:
        bucket = int(ts // self.bucket_s)
        if self._bucket is None:
            self._bucket = bucket
        elif bucket > self._bucket:
            self._fold(self._count)
            # Idle buckets are real zeros, but a long silence needs only enough of them
            # to pull the mean down; cap the loop so a week's gap costs nothing.
            for _ in range(min(bucket - self._bucket - 1, 3 * self.warmup + 10)):
                self._fold(0.0)
            self._bucket = bucket
            self._count = 0.0
        # An event older than the current bucket (out of order) counts in the current one.
        self._count += amount
        return self.judge()

    def judge(self) -> Verdict:
        count = self._count
        if self.stats.samples < self.warmup:
            return Verdict(count, None, count >= self.cold_ceiling)
        z = (count - self.stats.mean) / self.stats.spread
        return Verdict(count, z, count >= self.min_count and z >= self.z_threshold)

    def _fold(self, value: float) -> None:
        if self.stats.samples >= self.warmup:
            value = min(value, self.stats.mean + self.z_threshold * self.stats.spread)
        self.stats.fold(value)


class Cooldown:
    """One incident, one alert: remembers when each (type, subject) last fired."""

    def __init__(self, max_keys: int) -> None:
        self._last: BoundedMap[float] = BoundedMap(max_keys)

    def allow(self, key: str, ts: float, cooldown_s: float) -> bool:
        last = self._last.get(key)
        if last is not None and ts - last < cooldown_s:
            return False
        self._last.put(key, ts)
        return True
