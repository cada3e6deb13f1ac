"""What a call cost: the price table and the one cost formula, in integer micro-dollars.

The table is TOML (KEYVEIL_PRICES_FILE; `shared/prices.toml` ships the defaults for the
models of the default policy), in dollars as providers publish them:

    version = "2026-12-01"           # named by every usage event priced with it
    [models."gpt-4o-mini"]
    input = 0.15                     # per 1M text input tokens (uncached)
    cached_input = 0.075             # per 1M cached text input tokens
    output = 0.60                    # per 1M output tokens
    # audio_input, cached_audio_input, audio_output: per 1M audio tokens
    # characters: per 1M input characters; minute: per minute of audio; second: per second

Every price becomes an exact integer of micro-dollars (per million tokens or characters,
per minute, per second) at load time (a finer price is refused), and a cost is computed
with exact fractions and rounded up once, so the same usage always costs the same
integer on every replica.

Usage is what the provider reports: `input_tokens` counts all input tokens, cached and
audio ones included (as OpenAI's `prompt_tokens`/`input_tokens` do); `cached_tokens`
and `audio_input_tokens` are parts of it, `cached_audio_tokens` a part of the audio;
`output_tokens` counts all output tokens, `audio_output_tokens` a part of them. A part
without a price of its own is billed at its parent's (cached input at the input price).
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import ConfigError

__all__ = ["DEFAULT_PRICES_FILE", "ModelPrice", "PriceTable", "Usage", "load_prices"]

DEFAULT_PRICES_FILE = Path(__file__).with_name("prices.toml")
_VARIABLE = "KEYVEIL_PRICES_FILE"
_MILLION = 1_000_000


@dataclass(frozen=True, slots=True)
class Usage:
    """Billable units of one call or one voice tick, as the provider reported them."""

    input_tokens: int = 0
    cached_tokens: int = 0
    audio_input_tokens: int = 0
    cached_audio_tokens: int = 0
    output_tokens: int = 0
    audio_output_tokens: int = 0
    characters: int = 0
    seconds: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.cached_tokens + other.cached_tokens,
            self.audio_input_tokens + other.audio_input_tokens,
            self.cached_audio_tokens + other.cached_audio_tokens,
            self.output_tokens + other.output_tokens,
            self.audio_output_tokens + other.audio_output_tokens,
            self.characters + other.characters,
            self.seconds + other.seconds,
        )


def _micros(dollars: float | None, field: str) -> int | None:
    """Dollars -> integer micro-dollars (per the same unit), exactly."""
    if dollars is None:
        return None
    exact = Decimal(str(dollars)) * _MILLION
    if exact != exact.to_integral_value():
        raise ValueError(f"{field}: {dollars} is finer than one micro-dollar")
    return int(exact)


class ModelPrice(BaseModel):
    """One model's prices, in dollars per million units (minute and second: per unit)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float | None = Field(default=None, ge=0)
    cached_input: float | None = Field(default=None, ge=0)
    output: float | None = Field(default=None, ge=0)
    audio_input: float | None = Field(default=None, ge=0)
    cached_audio_input: float | None = Field(default=None, ge=0)
    audio_output: float | None = Field(default=None, ge=0)
    characters: float | None = Field(default=None, ge=0)
    minute: float | None = Field(default=None, ge=0)
    second: float | None = Field(default=None, ge=0)


@dataclass(frozen=True, slots=True)
class _Rates:
    """Integer micro-dollars per million tokens or characters; per minute and per second."""

    input: int
    cached_input: int
    output: int
    audio_input: int
    cached_audio_input: int
    audio_output: int
    characters: int
    minute: int
    second: int

    @classmethod
    def of(cls, price: ModelPrice, model: str) -> Self:
        def rate(name: str) -> int | None:
            return _micros(getattr(price, name), f"models.{model}.{name}")

        text_in = rate("input") or 0
        audio_in = rate("audio_input")
        audio_in = text_in if audio_in is None else audio_in
        cached = rate("cached_input")
        cached_audio = rate("cached_audio_input")
        output = rate("output") or 0
        audio_out = rate("audio_output")
        return cls(
            input=text_in,
            cached_input=text_in if cached is None else cached,
            output=output,
            audio_input=audio_in,
            cached_audio_input=audio_in if cached_audio is None else cached_audio,
            audio_output=output if audio_out is None else audio_out,
            characters=rate("characters") or 0,
            minute=rate("minute") or 0,
            second=rate("second") or 0,
        )

    def cost(self, usage: Usage) -> int:
        audio_in = min(usage.audio_input_tokens, usage.input_tokens)
        cached_audio = min(usage.cached_audio_tokens, audio_in)
        text_in = usage.input_tokens - audio_in
        cached_text = min(usage.cached_tokens, text_in)
        audio_out = min(usage.audio_output_tokens, usage.output_tokens)
        per_million = (
            (text_in - cached_text) * self.input
            + cached_text * self.cached_input
            + (audio_in - cached_audio) * self.audio_input
            + cached_audio * self.cached_audio_input
            + (usage.output_tokens - audio_out) * self.output
            + audio_out * self.audio_output
            + usage.characters * self.characters
        )
        if usage.seconds <= 0:
            return -(-per_million // _MILLION)  # the same ceiling, in integers (hot path)
        seconds = Fraction(usage.seconds)
        total = Fraction(per_million, _MILLION) + seconds * self.second + seconds * self.minute / 60
        return math.ceil(total)


class _TableFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(min_length=1, max_length=64)
    models: dict[str, ModelPrice] = Field(min_length=1)


class PriceTable:
    """Prices by model; `cost` is the only place a cost is computed."""

    def __init__(self, version: str, models: dict[str, ModelPrice]) -> None:
        self.version = version
        self._rates = {name: _Rates.of(price, name) for name, price in models.items()}
        # Longest first, so "gpt-4o-mini-2024-07-18" matches gpt-4o-mini, not gpt-4o.
        self._prefixes = sorted(self._rates, key=len, reverse=True)

    @property
    def models(self) -> frozenset[str]:
        return frozenset(self._rates)

    def family(self, model: str | None) -> str | None:
        """The table's name for `model`: itself, or the family of a dated snapshot."""
        if model is None:
            return None
        if model in self._rates:
            return model
        # A dated snapshot ("gpt-4o-2024-08-06") is priced as its family; a different
        # model sharing a prefix ("gpt-4o-audio-preview") is not.
        for name in self._prefixes:
            rest = model[len(name) :]
            if model.startswith(name) and rest[:1] == "-" and rest[1:5].isdigit():
                return name
        return None

    def _rates_for(self, model: str) -> _Rates | None:
        name = self.family(model)
        return None if name is None else self._rates[name]

    def priced(self, model: str | None) -> bool:
        return self.family(model) is not None

    def cost(self, model: str | None, usage: Usage) -> int | None:
        """Micro-dollars, rounded up; None for a model the table does not price."""
        rates = self._rates_for(model) if model is not None else None
        return None if rates is None else rates.cost(usage)


def parse_prices(text: str) -> PriceTable:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([(_VARIABLE, f"not valid TOML ({exc})")]) from None
    try:
        table = _TableFile.model_validate(raw)
        return PriceTable(table.version, table.models)
    except ValidationError as exc:
        problems = [
            (_VARIABLE, f"{'.'.join(str(p) for p in e['loc']) or 'prices'}: {e['msg']}")
            for e in exc.errors(include_input=False, include_url=False)
        ]
        raise ConfigError(problems) from None
    except ValueError as exc:
        raise ConfigError([(_VARIABLE, str(exc))]) from None


def load_prices(path: str | Path | None = None) -> PriceTable:
    """The table at `path`, else at KEYVEIL_PRICES_FILE, else the shipped default."""
    chosen = path or os.environ.get(_VARIABLE) or DEFAULT_PRICES_FILE
    try:
        text = Path(chosen).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([(_VARIABLE, f"cannot read {chosen} ({exc.strerror})")]) from None
    return parse_prices(text)
