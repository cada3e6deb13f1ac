"""The provider's usage reports, read into `shared.pricing.Usage`: one reader for every shape.

Shapes (OpenAI):

- chat completions: `usage.prompt_tokens` / `completion_tokens`, with
  `prompt_tokens_details.{cached_tokens,audio_tokens}` and
  `completion_tokens_details.audio_tokens` (JSON, and a stream's final chunk);
- Responses: `usage.input_tokens` / `output_tokens`, `input_tokens_details.cached_tokens`
  (JSON, and `response.completed`'s `response.usage`);
- speech: `speech.audio.done`'s `usage.input_tokens` (text) / `output_tokens` (audio);
- transcription: `usage` of `type: "tokens"` (`input_token_details.audio_tokens`) or
  `type: "duration"` (`seconds`), in JSON or `transcript.text.done`;
- Realtime: `response.done`'s `response.usage` with `input_token_details`
  (`cached_tokens`, `audio_tokens`, `cached_tokens_details.audio_tokens`) and
  `output_token_details.audio_tokens`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from shared.pricing import PriceTable, Usage

__all__ = ["Priced", "SpendMeter", "event_fields", "read_usage", "usage_of"]

# Labels: the price table's model name (or "unpriced") and the token's app; never a
# user, a token or a session id.
TOKENS = Counter(
    "keyveil_usage_tokens_total",
    "Provider-reported tokens (kind: input|cached|audio_input|output|audio_output)",
    ["model", "app", "kind"],
)
SECONDS = Counter(
    "keyveil_usage_seconds_total", "Provider-reported billable seconds", ["model", "app"]
)
CHARACTERS = Counter(
    "keyveil_usage_characters_total", "Billed input characters (speech)", ["model", "app"]
)
COST = Counter(
    "keyveil_usage_cost_micros_total",
    "Cost of provider usage, micro-dollars, by the price table",
    ["model", "app"],
)
UNPRICED = "unpriced"


def _count(source: object, name: str) -> int:
    if not isinstance(source, Mapping):
        return 0
    value = source.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _details(usage: Mapping[str, Any], *names: str) -> Mapping[str, Any]:
    for name in names:
        found = usage.get(name)
        if isinstance(found, Mapping):
            return found
    return {}


def read_usage(usage: object, *, audio_output: bool = False) -> Usage | None:
    """One `usage` object; `audio_output` when every output token is audio (speech)."""
    if not isinstance(usage, Mapping):
        return None
    if usage.get("type") == "duration":
        seconds = usage.get("seconds")
        if isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds >= 0:
            return Usage(seconds=float(seconds))
        return None
    inputs = _count(usage, "prompt_tokens") or _count(usage, "input_tokens")
    outputs = _count(usage, "completion_tokens") or _count(usage, "output_tokens")
    ins = _details(usage, "prompt_tokens_details", "input_tokens_details", "input_token_details")
    outs = _details(
        usage, "completion_tokens_details", "output_tokens_details", "output_token_details"
    )
    audio_in = _count(ins, "audio_tokens")
    cached = _count(ins, "cached_tokens")
    cached_audio = _count(ins.get("cached_tokens_details"), "audio_tokens")
    audio_out = outputs if audio_output else _count(outs, "audio_tokens")
    if not (inputs or outputs or "total_tokens" in usage):
        return None
    return Usage(
        input_tokens=inputs,
        cached_tokens=max(cached - cached_audio, 0),
        audio_input_tokens=audio_in,
        cached_audio_tokens=cached_audio,
        output_tokens=outputs,
        audio_output_tokens=audio_out,
    )


def usage_of(payload: object, *, audio_output: bool = False) -> Usage | None:
    """The usage inside one answer or event: top-level `usage`, or `response.usage`."""
    if not isinstance(payload, Mapping):
        return None
    usage = payload.get("usage")
    if usage is None:
        response = payload.get("response")
        usage = response.get("usage") if isinstance(response, Mapping) else None
    return read_usage(usage, audio_output=audio_output)


@dataclass(frozen=True, slots=True)
class Priced:
    usage: Usage
    cost_micros: int | None
    price_version: str


_CHILD_CACHE = 4096


class SpendMeter:
    """Prices usage with the one formula and counts it in Prometheus."""

    def __init__(self, prices: PriceTable) -> None:
        self.prices = prices
        # Label children bound once (labels() takes a lock and builds a key every call);
        # the label values are bounded already, the cap only guards the cache itself.
        self._children: dict[tuple[str, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric._name, *labels)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*labels)
            if len(self._children) < _CHILD_CACHE:
                self._children[key] = child
        return child

    def record(
        self, *, model: str | None, app: str | None, usage: Usage, already: Usage | None = None
    ) -> Priced:
        """`usage` priced and counted. `already`: what was billed before of a cumulative
        total (voice seconds): the cost is then cost(already + usage) - cost(already), so
        the costs of a session's ticks add up to the cost of its total, exactly."""
        cost = self.prices.cost(model, usage)
        if already is not None and cost is not None:
            before = self.prices.cost(model, already) or 0
            cost = (self.prices.cost(model, already + usage) or 0) - before
        label = self.prices.family(model) or UNPRICED
        where = (label, app or "none")
        for kind, count in (
            ("input", usage.input_tokens - usage.cached_tokens - usage.audio_input_tokens),
            ("cached", usage.cached_tokens + usage.cached_audio_tokens),
            ("audio_input", usage.audio_input_tokens - usage.cached_audio_tokens),
            ("output", usage.output_tokens - usage.audio_output_tokens),
            ("audio_output", usage.audio_output_tokens),
        ):
            if count > 0:
                self._child(TOKENS, *where, kind).inc(count)
        if usage.seconds > 0:
            self._child(SECONDS, *where).inc(usage.seconds)
        if usage.characters > 0:
            self._child(CHARACTERS, *where).inc(usage.characters)
        if cost:
            self._child(COST, *where).inc(cost)
        return Priced(usage, cost, self.prices.version)


def event_fields(priced: Priced) -> dict[str, Any]:
    """A UsageEvent's metered fields (shared.events): the reported units and the cost."""
    usage = priced.usage
    tokens = usage.input_tokens or usage.output_tokens
    return {
        "prompt_tokens": usage.input_tokens if tokens else None,
        "completion_tokens": usage.output_tokens if tokens else None,
        "total_tokens": usage.total_tokens if tokens else None,
        "cached_tokens": usage.cached_tokens if tokens else None,
        "audio_input_tokens": usage.audio_input_tokens or None,
        "cached_audio_tokens": usage.cached_audio_tokens or None,
        "audio_output_tokens": usage.audio_output_tokens or None,
        "characters": usage.characters or None,
        "seconds": usage.seconds or None,
        "cost_micros": priced.cost_micros,
        "price_version": priced.price_version,
    }
