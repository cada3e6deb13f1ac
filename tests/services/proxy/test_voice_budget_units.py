"""The voice hold's arithmetic: whole seconds on a cumulative total, and what a session
holds ahead (the configured amount, priced, capped by the session length)."""

from __future__ import annotations

import redis.asyncio as aioredis

from services.proxy.voice.budget import VoiceBudget, whole_seconds
from shared.budgets import Budgets, Metered
from shared.pricing import DEFAULT_PRICES_FILE, Usage, load_prices
from shared.voicepolicy import VoiceApi

PRICES = load_prices(DEFAULT_PRICES_FILE)


def test_whole_seconds_round_up_the_running_total_so_they_add_up() -> None:
    reports = [0.4, 1.0, 1.6, 3.0, 3.2]
    charged, before = [], 0.0
    for total in reports:
        charged.append(whole_seconds(before, total))
        before = total
    assert charged == [1, 0, 1, 1, 1]
    assert sum(charged) == 4  # ceil(3.2): the provider bills every started second
    assert whole_seconds(3.0, 2.0) == 0  # an older report adds nothing


def test_the_hold_ahead_is_the_configured_amount_priced_and_capped_by_the_session() -> None:
    budget = VoiceBudget(
        Budgets(aioredis.Redis()), PRICES, ahead_s=5, ahead_tokens=100, max_session_s=30
    )
    per_second = PRICES.cost("gpt-live-1", Usage(seconds=1))
    assert per_second is not None
    assert budget.ahead(VoiceApi.live, "gpt-live-1") == Metered(micros=5 * per_second, seconds=5)
    tokens = budget.ahead(VoiceApi.realtime, "gpt-realtime")
    assert (tokens.tokens, tokens.seconds) == (100, None)
    assert tokens.micros == PRICES.cost(
        "gpt-realtime", Usage(output_tokens=100, audio_output_tokens=100)
    )
    tiny = VoiceBudget(
        Budgets(aioredis.Redis()), None, ahead_s=60, ahead_tokens=1, max_session_s=10
    )
    assert tiny.ahead(VoiceApi.live, "gpt-live-1") == Metered(micros=0, seconds=10)
