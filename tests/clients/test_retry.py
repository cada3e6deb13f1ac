"""Backoff with full jitter, Retry-After honoured, and when to give up."""

from __future__ import annotations

import email.utils
import random

import pytest

from keyveil.client import RetryPolicy, parse_retry_after


@pytest.mark.parametrize(
    ("value", "expected"),
    [("3", 3.0), (" 0 ", 0.0), ("", None), (None, None), ("soon", None), ("-1", None)],
)
def test_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_retry_after_http_date_is_relative_to_now() -> None:
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 7, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(7.0)
    assert parse_retry_after(email.utils.formatdate(now - 50, usegmt=True), now=now) == 0.0


def test_backoff_grows_exponentially_within_the_cap() -> None:
    policy = RetryPolicy(max_attempts=10, base_delay_s=0.5, max_delay_s=4.0)
    rng = random.Random(7)
    for attempt, ceiling in enumerate([0.5, 1.0, 2.0, 4.0, 4.0, 4.0]):
        samples = [policy.backoff_s(attempt, rng) for _ in range(200)]
        assert all(0.0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.8  # jitter spreads over the whole range


def test_retry_after_is_a_floor_with_bounded_jitter() -> None:
    policy = RetryPolicy(base_delay_s=0.25)
    rng = random.Random(1)
    delays = [policy.delay_s(0, 2.0, rng) for _ in range(100)]
    assert all(d is not None and 2.0 <= d <= 2.25 for d in delays)


def test_gives_up_after_max_attempts_or_an_excessive_retry_after() -> None:
    policy = RetryPolicy(max_attempts=3, max_retry_after_s=10)
    rng = random.Random(0)
    assert policy.delay_s(0, None, rng) is not None
    assert policy.delay_s(1, None, rng) is not None
    assert policy.delay_s(2, None, rng) is None
    assert policy.delay_s(0, 11.0, rng) is None
