"""Budgets at the proxy: an estimate reserved before forwarding, settled when it ends.

Budgeted: chat completions, Responses, speech and transcription. The estimate is what
the call can cost at most, known before it goes upstream:

    chat, Responses   input tokens <= the body's bytes; output <= the request's max
                      tokens, else the policy's cap, else `_DEFAULT_OUTPUT_CAP`
    speech            input tokens <= the body's bytes, characters = the input's; audio
                      output <= the policy's max_tokens, else `_DEFAULT_OUTPUT_CAP`
                      (OpenAI reads at most 4096 characters: ~5 minutes of audio)
    transcription     seconds <= the upload's bytes at `_MIN_AUDIO_BYTES_PER_S`; audio
                      tokens `_AUDIO_TOKENS_PER_S` per second, a prompt of at most
                      `_PROMPT_TOKENS`, output <= `_DEFAULT_OUTPUT_CAP`

priced at the uncached (and, where it is dearer, audio) rates. The reservation is made
in the admission's Redis round trip (`claim` for `Admission.check(rider=...)`, then
`held`). A call that ends without reported usage is settled with nothing when the
provider never answered (refused, errored, a 4xx), and with its whole estimate when
the answer was cut (client gone, stream broken) or came without a usage report: the
provider bills what it generated. Settlements are batched off the request path.
"""

from __future__ import annotations

import math

from shared.budgets import BudgetExceeded, Budgets, BudgetUnavailable, Claim, Estimate, Hold
from shared.contract import Refusal
from shared.errors import ApiError
from shared.metering import Priced
from shared.pricing import PriceTable, Usage
from shared.ratelimit import Decision
from shared.tokens import ProxyClaims

from .bodies import JsonBody, Upload
from .routes import Route

__all__ = ["SpendGuard", "budget_spent", "budgets_unavailable"]

_BUDGETED = frozenset({"chat_completions", "responses", "audio_speech", "audio_transcriptions"})
_OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_DEFAULT_OUTPUT_CAP = 16_384
# Transcription: 1 kB/s is 8 kbit/s, below the usual speech codecs' lowest bitrates (a
# file of near-silence in FLAC can be longer: a known gap). Audio input tokens: 10 per
# second in OpenAI's models today, 20 here. Prompt: whisper reads at most 224 tokens.
_MIN_AUDIO_BYTES_PER_S = 1000
_AUDIO_TOKENS_PER_S = 20
_PROMPT_TOKENS = 1024
_CUT = frozenset({499, 502})


def _subjects(claims: ProxyClaims) -> list[tuple[str, str]]:
    out = [("token", claims.jti), ("global", "all")]
    if claims.sub:
        out.append(("user", claims.sub))
    if claims.app:
        out.append(("app", claims.app))
    return out


def budget_spent(exc: BudgetExceeded) -> ApiError:
    """429 `budget_exceeded`, naming the budget in its RateLimit headers (HTTP and voice)."""
    return Refusal.BUDGET_EXCEEDED.error(f"the {exc.name} budget is spent", headers=exc.headers())


def budgets_unavailable() -> ApiError:
    """503 `budget_unavailable`: Redis away and the budget failure mode closed."""
    return Refusal.BUDGET_UNAVAILABLE.error()


class SpendGuard:
    def __init__(self, budgets: Budgets, prices: PriceTable) -> None:
        self._budgets = budgets
        self._prices = prices

    @staticmethod
    def covers(route: Route) -> bool:
        return route.endpoint in _BUDGETED

    def _estimate(self, model: str | None, worst: Usage) -> Estimate:
        return Estimate(worst.total_tokens, self._prices.cost(model, worst) or 0)

    def estimate(self, route: Route, body: JsonBody, policy_cap: int | None) -> Estimate:
        """The most a JSON call (chat, Responses, speech) can use."""
        payload = body.payload
        if route.endpoint == "audio_speech":
            text = payload.get("input")
            cap = policy_cap or _DEFAULT_OUTPUT_CAP
            worst = Usage(
                input_tokens=len(body.raw),
                output_tokens=cap,
                audio_output_tokens=cap,
                characters=len(text) if isinstance(text, str) else 0,
            )
            return self._estimate(body.model, worst)
        cap = next(
            (
                v
                for f in _OUTPUT_FIELDS
                if isinstance(v := payload.get(f), int) and not isinstance(v, bool)
            ),
            policy_cap or _DEFAULT_OUTPUT_CAP,
        )
        worst = Usage(input_tokens=len(body.raw), output_tokens=max(cap, 0))
        return self._estimate(body.model, worst)

    def upload_estimate(self, upload: Upload) -> Estimate:
        """The most a transcription of this upload can use (from its size)."""
        seconds = math.ceil(upload.size / _MIN_AUDIO_BYTES_PER_S)
        audio = seconds * _AUDIO_TOKENS_PER_S
        worst = Usage(
            input_tokens=audio + _PROMPT_TOKENS,
            audio_input_tokens=audio,
            output_tokens=_DEFAULT_OUTPUT_CAP,
            seconds=float(seconds),
        )
        return self._estimate(upload.model, worst)

    def claim(self, claims: ProxyClaims, estimate: Estimate) -> Claim:
        """The reservation to make in the admission round trip."""
        return self._budgets.claim(subjects=_subjects(claims), estimate=estimate)

    def held(self, claim: Claim, decision: Decision) -> Hold | None:
        """The claim's hold; raises 429 `budget_exceeded` or 503 `budget_unavailable`."""
        try:
            return self._budgets.held(claim, decision)
        except BudgetExceeded as exc:
            raise budget_spent(exc) from None
        except BudgetUnavailable:
            raise budgets_unavailable() from None

    @staticmethod
    def charge(hold: Hold, status: int, priced: Priced | None, *, relayed: bool) -> tuple[int, int]:
        """(tokens, micros) to settle `hold` with; `relayed`: an answer was being sent."""
        if priced is not None:
            return priced.usage.total_tokens, priced.cost_micros or 0
        if relayed and (status in _CUT or 200 <= status < 300):
            # Answered (or cut mid-answer) without a usage report: the provider billed
            # something nobody told us about, so the whole estimate stays counted.
            return hold.estimate.tokens, hold.estimate.micros
        return 0, 0

    def settle(self, hold: Hold, status: int, priced: Priced | None, *, relayed: bool) -> None:
        """Queue the settlement (sent in a batch; a lost one lapses by its TTL)."""
        tokens, micros = self.charge(hold, status, priced, relayed=relayed)
        self._budgets.settle_soon(hold, tokens=tokens, micros=micros)
