"""The cost formula against OpenAI's published prices, in integer micro-dollars."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import ConfigError
from shared.policy import default_policy
from shared.pricing import DEFAULT_PRICES_FILE, Usage, load_prices, parse_prices
from shared.voicepolicy import DEFAULT_LIVE_MODELS

PRICES = load_prices(DEFAULT_PRICES_FILE)


def test_the_shipped_table_prices_every_model_of_the_default_policy() -> None:
    policy = default_policy()
    wanted = {m for rules in policy.endpoints.values() for m in rules.models} | set(
        DEFAULT_LIVE_MODELS
    )
    assert wanted - PRICES.models == set()
    assert PRICES.version == "2026-12-01"


def test_chat_tokens_with_a_cached_part() -> None:
    # gpt-4o-mini: $0.15 in, $0.075 cached in, $0.60 out per 1M tokens.
    usage = Usage(input_tokens=1000, cached_tokens=200, output_tokens=500)
    assert PRICES.cost("gpt-4o-mini", usage) == 120 + 15 + 300
    # gpt-4o: a million in and a million out is $2.50 + $10.00.
    assert PRICES.cost("gpt-4o", Usage(input_tokens=10**6, output_tokens=10**6)) == 12_500_000
    # gpt-5-mini: $0.25 / $0.025 / $2.00.
    assert PRICES.cost("gpt-5-mini", Usage(input_tokens=4000, output_tokens=1000)) == 3000


def test_a_fraction_of_a_micro_dollar_is_rounded_up_once() -> None:
    assert PRICES.cost("gpt-4o-mini", Usage(input_tokens=1)) == 1  # 0.15 micro-dollars
    assert PRICES.cost("gpt-4o-mini", Usage(input_tokens=7)) == 2  # 1.05
    assert PRICES.cost("gpt-4o-mini", Usage()) == 0


def test_speech_per_character_and_per_token() -> None:
    # tts-1 $15 and tts-1-hd $30 per 1M characters.
    assert PRICES.cost("tts-1", Usage(characters=4096)) == 61_440
    assert PRICES.cost("tts-1-hd", Usage(characters=1000)) == 30_000
    # gpt-4o-mini-tts: $0.60 per 1M text in, $12 per 1M audio out.
    usage = Usage(input_tokens=100, output_tokens=2000, audio_output_tokens=2000)
    assert PRICES.cost("gpt-4o-mini-tts", usage) == 60 + 24_000


def test_transcription_per_minute_and_per_token() -> None:
    assert PRICES.cost("whisper-1", Usage(seconds=90)) == 9_000  # 1.5 min x $0.006
    assert PRICES.cost("whisper-1", Usage(seconds=1)) == 100
    # gpt-4o-transcribe: $6 per 1M audio in, $2.50 text in, $10 out.
    usage = Usage(input_tokens=1100, audio_input_tokens=1000, output_tokens=300)
    assert PRICES.cost("gpt-4o-transcribe", usage) == 6_000 + 250 + 3_000


def test_realtime_audio_and_text_tokens_with_their_cached_rates() -> None:
    # gpt-realtime: audio $32 in ($0.40 cached), $64 out; text $4 in, $16 out.
    usage = Usage(
        input_tokens=1200,
        audio_input_tokens=1000,
        cached_audio_tokens=100,
        output_tokens=550,
        audio_output_tokens=500,
    )
    assert PRICES.cost("gpt-realtime", usage) == 28_800 + 40 + 800 + 32_000 + 800


def test_live_seconds() -> None:
    assert PRICES.cost("gpt-live-1", Usage(seconds=90.5)) == 90_500
    assert PRICES.cost("gpt-live-1.1", Usage(seconds=60)) == 72_000


def test_snapshots_are_priced_as_their_family_and_unknown_models_not_at_all() -> None:
    usage = Usage(input_tokens=1000, output_tokens=1000)
    assert PRICES.cost("gpt-4o-mini-2024-07-18", usage) == PRICES.cost("gpt-4o-mini", usage)
    assert PRICES.cost("gpt-4o-2024-08-06", usage) == PRICES.cost("gpt-4o", usage)
    assert PRICES.cost("gpt-4o-audio-preview", usage) is None
    assert PRICES.cost("o1-pro", usage) is None
    assert PRICES.cost(None, usage) is None
    assert not PRICES.priced("o1-pro")
    assert PRICES.priced("gpt-4o-mini-2024-07-18")


@given(a=st.integers(0, 10**7), b=st.integers(0, 10**7), c=st.integers(0, 10**7))
def test_cost_never_goes_down_with_more_usage(a: int, b: int, c: int) -> None:
    small = Usage(input_tokens=a, output_tokens=b)
    large = Usage(input_tokens=a + c, output_tokens=b)
    cost_small = PRICES.cost("gpt-4.1", small)
    cost_large = PRICES.cost("gpt-4.1", large)
    assert cost_small is not None
    assert cost_large is not None
    assert 0 <= cost_small <= cost_large
    exact = a * 2.0 + b * 8.0  # dollars per 1M at $2 / $8 = micro-dollars
    assert cost_small - 1 < exact <= cost_small + 1e-6


def test_invalid_tables_name_the_variable_and_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"KEYVEIL_PRICES_FILE: version"):
        parse_prices('[models."m"]\ninput = 1.0\n')
    with pytest.raises(ConfigError, match=r"models.m.inptu"):
        parse_prices('version = "1"\n[models."m"]\ninptu = 1.0\n')
    with pytest.raises(ConfigError, match=r"finer than one micro-dollar"):
        parse_prices('version = "1"\n[models."m"]\ninput = 0.0000001\n')
    with pytest.raises(ConfigError, match=r"greater than or equal to 0"):
        parse_prices('version = "1"\n[models."m"]\noutput = -1\n')
    with pytest.raises(ConfigError, match=r"not valid TOML"):
        parse_prices("version = ")
    with pytest.raises(ConfigError, match=r"cannot read"):
        load_prices(tmp_path / "missing.toml")
    own = tmp_path / "prices.toml"
    own.write_text('version = "contract-7"\n[models."gpt-4o-mini"]\ninput = 0.10\n')
    table = load_prices(own)
    assert table.version == "contract-7"
    assert table.cost("gpt-4o-mini", Usage(input_tokens=10**6)) == 100_000
