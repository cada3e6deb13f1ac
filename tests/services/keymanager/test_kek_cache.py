"""The data-key cache: bounded by age since the unwrap (not since last use) and by count."""

from __future__ import annotations

from services.keymanager.kek import DataKeyCache, WrapContext, WrappedKey

CONTEXT = WrapContext(aad=b"keyveil-key-v1|key_0|1|openai|development", fields={})


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _wrapped(n: int) -> WrappedKey:
    return WrappedKey("vault-transit:transit/k:v1", f"vault:v1:{n}".encode())


def test_entries_expire_counted_from_the_unwrap_however_often_used() -> None:
    clock = Clock()
    cache = DataKeyCache(ttl_s=10, max_entries=8, clock=clock)
    cache.put(_wrapped(1), CONTEXT, b"k" * 32)
    for _ in range(9):
        clock.now += 1
        assert cache.get(_wrapped(1), CONTEXT) == b"k" * 32
    clock.now += 1.0
    assert cache.get(_wrapped(1), CONTEXT) is None
    assert len(cache) == 0


def test_the_least_recently_used_entry_goes_first_past_the_bound() -> None:
    cache = DataKeyCache(ttl_s=60, max_entries=2, clock=Clock())
    cache.put(_wrapped(1), CONTEXT, b"1" * 32)
    cache.put(_wrapped(2), CONTEXT, b"2" * 32)
    assert cache.get(_wrapped(1), CONTEXT) is not None  # 2 is now the oldest use
    cache.put(_wrapped(3), CONTEXT, b"3" * 32)
    assert len(cache) == 2
    assert cache.get(_wrapped(2), CONTEXT) is None
    assert cache.get(_wrapped(1), CONTEXT) == b"1" * 32


def test_other_context_or_blob_is_a_miss_and_zero_ttl_caches_nothing() -> None:
    cache = DataKeyCache(ttl_s=60, max_entries=2, clock=Clock())
    cache.put(_wrapped(1), CONTEXT, b"1" * 32)
    other = WrapContext(aad=CONTEXT.aad.replace(b"|1|", b"|2|"), fields={})
    assert cache.get(_wrapped(1), other) is None
    assert cache.get(_wrapped(9), CONTEXT) is None
    off = DataKeyCache(ttl_s=0, max_entries=2, clock=Clock())
    off.put(_wrapped(1), CONTEXT, b"1" * 32)
    assert len(off) == 0
    assert "vault:v1:1" not in repr(_wrapped(1))  # a wrapped key prints as its size only
