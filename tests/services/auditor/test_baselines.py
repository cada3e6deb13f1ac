"""The counters under the detectors: bounded, event-time, robust at cold start."""

from __future__ import annotations

from services.auditor.baselines import Baseline, BoundedMap, Cooldown, RatioWindow, WindowCounter


def test_window_counter_counts_only_inside_the_window() -> None:
    counter = WindowCounter(window_s=10, cap=100, max_keys=10)
    assert [counter.add("a", t) for t in (0, 1, 2)] == [1, 2, 3]
    assert counter.add("a", 12.5) == 1  # 0, 1 and 2 fell out
    assert counter.add("b", 13) == 1


def test_window_counter_memory_is_capped_per_key_and_in_keys() -> None:
    counter = WindowCounter(window_s=10, cap=5, max_keys=3)
    counts = [counter.add("a", i * 0.01) for i in range(1000)]
    assert max(counts) == 5
    for key in "bcd":
        counter.add(key, 1)
    assert "a" not in counter._keys  # least recently used key evicted
    assert len(counter._keys) == 3


def test_bounded_map_evicts_least_recent() -> None:
    table: BoundedMap[int] = BoundedMap(2)
    table.put("a", 1)
    table.put("b", 2)
    assert table.get("a") == 1  # a is now recent
    table.put("c", 3)
    assert "b" not in table
    assert "a" in table


def test_ratio_window_slides() -> None:
    window = RatioWindow(window_s=10)
    for t in range(10):
        window.add(t, bad=t < 5)
    assert window.total == 10
    assert window.add(10, bad=False) == 4 / 10  # second 0 left the window
    assert window.add(30, bad=True) == 1.0


def test_baseline_learns_then_flags_a_spike_and_is_not_poisoned() -> None:
    base = Baseline(
        bucket_s=60, alpha=0.2, warmup=5, z_threshold=5, min_count=20, cold_ceiling=1000
    )
    t = 0.0
    for _ in range(20):  # 10 a minute
        for i in range(10):
            assert not base.add(t + i).spike
        t += 60
    verdicts = [base.add(t + i * 0.1) for i in range(100)]
    first = next(i for i, v in enumerate(verdicts) if v.spike)
    assert 20 <= first + 1 <= 40, "fires as soon as the count is both large and improbable"
    # The next minute's ordinary traffic is ordinary again: the spike was winsorised.
    t += 60
    assert not any(base.add(t + i).spike for i in range(10))
    assert base.stats.mean < 30


def test_baseline_cold_start_only_fires_above_the_ceiling() -> None:
    base = Baseline(bucket_s=60, alpha=0.2, warmup=5, z_threshold=5, min_count=20, cold_ceiling=200)
    verdicts = [base.add(i * 0.1) for i in range(199)]
    assert not any(v.spike for v in verdicts)
    assert all(v.z is None for v in verdicts)
    assert base.add(20).spike


def test_baseline_idle_gap_folds_zeros_cheaply() -> None:
    base = Baseline(bucket_s=1, alpha=0.5, warmup=2, z_threshold=5, min_count=5, cold_ceiling=100)
    base.add(0)
    base.add(10_000_000)  # a long silence costs a bounded number of folds
    assert base.stats.samples <= 3 * 2 + 10 + 1
    assert base.stats.mean < 0.01


def test_cooldown() -> None:
    cooldown = Cooldown(max_keys=10)
    assert cooldown.allow("x", 0, 60)
    assert not cooldown.allow("x", 59, 60)
    assert cooldown.allow("y", 59, 60)
    assert cooldown.allow("x", 60, 60)
