"""Spend budgets shared by every replica: reserve before forwarding, reconcile at the end.

A budget is a limit on one subject's usage in one window:

    scope    token | user | app | global      (subject: token id, user hash, app, "all")
    unit     tokens | micros | seconds        (provider-reported tokens, micro-dollars, or
                                              billable voice seconds: GPT-Live bills time)
    window   minute | day | month             (fixed UTC windows; month = calendar month)

Budgets live in Redis, in one hash (`kv:budget:cfg`, field
`scope:subject:unit:window` = limit; subject `*` applies to every subject of the scope
that has no budget of its own), written by `keyveil budgets set|reset`, so every
replica sees a change at once and the proxy needs no configuration for them.

Admission (`_RESERVE_LUA`, atomic): for every budget that applies, the window's
committed usage plus the live reservations plus this request's estimate must fit the
limit, else nothing is reserved and the call is refused (429 `budget_exceeded`, naming
the budget). Otherwise the estimate is held, in a sorted set per counter scored by its
expiry, with a running sum beside it: a proxy killed mid-stream leaves a reservation
that stops counting when its TTL passes. The proxy runs this script as the rider of
the admission script (`ADMISSION_RIDER`, `shared.ratelimit.admission_with`): block,
revocation, nonce, rate limits and budgets in one round trip, all or nothing; a call
refused by a budget consumes no rate limit and no nonce, one refused by a check holds
nothing. `Budgets.reserve` runs it alone.

At the end (`_SETTLE_LUA`) the reservation is dropped and the real usage is added to
the counter; `settle_soon` queues settlements and sends those queued meanwhile in one
call, off the request path. The estimate is an upper bound (input bytes for input
tokens, the output cap for output tokens), so the committed spend never passes a limit
by more than one reservation's error.

Live voice sessions cannot be bounded before they start: each keeps a rolling hold
ahead of its usage instead (`_VOICE_LUA`, used by services/proxy/voice/budget.py),
charged every sideband report and topped up from the room left.

Redis unreachable: `closed` (the default, 503 `budget_unavailable`) or `open`
(KEYVEIL_BUDGET_FAILURE_MODE; the call goes through uncounted). In the combined script
the admission's own failure mode decides first. Keys carry the `{budget}` hash tag.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import redis.asyncio as aioredis
from prometheus_client import Counter

from shared.ratelimit import (
    Decision,
    PipelinedScript,
    RedisUnavailableError,
    RiderCall,
    redis_unavailable,
)

__all__ = [
    "ADMISSION_RIDER",
    "CONFIG_KEY",
    "SCOPES",
    "UNITS",
    "WINDOWS",
    "BudgetAdmin",
    "BudgetExceeded",
    "BudgetState",
    "BudgetUnavailable",
    "Budgets",
    "Claim",
    "Estimate",
    "Hold",
    "Metered",
    "VoiceCharge",
    "budget_field",
    "counter_key",
    "window_index",
]

Scope = Literal["token", "user", "app", "global"]
Unit = Literal["tokens", "micros", "seconds"]
Window = Literal["minute", "day", "month"]
SCOPES: Final[tuple[Scope, ...]] = ("token", "user", "app", "global")
UNITS: Final[tuple[Unit, ...]] = ("tokens", "micros", "seconds")
WINDOWS: Final[tuple[Window, ...]] = ("minute", "day", "month")
CONFIG_KEY: Final = "kv:budget:{budget}:cfg"
INDEX_FIELD: Final = "_index"

log = logging.getLogger(__name__)

DECISIONS = Counter(
    "keyveil_budget_decisions_total",
    "Budget reservations (result: reserved|exceeded|unavailable|none)",
    ["result"],
)
_RESERVED, _EXCEEDED, _UNAVAILABLE, _NONE = (
    DECISIONS.labels(result) for result in ("reserved", "exceeded", "unavailable", "none")
)


def budget_field(scope: str, subject: str, unit: str, window: str) -> str:
    return f"{scope}:{subject}:{unit}:{window}"


# The start every script shares: Redis time, the calendar windows (minute, day, UTC month)
# and the lookup of every configured budget that applies to the given (scope, subject)
# pairs. The script puts before it `est` (amount per unit; a unit without one, nil, is
# not looked up: HTTP calls bill no seconds) and `first_pair` (where the pairs start).
_LOOKUP_LUA: Final = r"""
local cfg = KEYS[1]
local index = redis.call('HGET', cfg, '_index')
if not index and redis.call('EXISTS', cfg) == 0 then return {0} end
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now_ms = sec * 1000 + math.floor(tonumber(t[2]) / 1000)
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end
local function civil(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end
local function window(w)
  if w == 'minute' then local i = math.floor(sec / 60) return i, (i + 1) * 60 end
  if w == 'day' then local i = math.floor(sec / 86400) return i, (i + 1) * 86400 end
  local y, m = civil(math.floor(sec / 86400))
  local ny, nm = y, m + 1
  if nm == 13 then ny, nm = y + 1, 1 end
  return y * 12 + m - 1, days_from_civil(ny, nm, 1) * 86400
end
-- Live holds of a counter: a sorted set (`base:held`, member `id|amount`, scored by
-- expiry) and their running sum (`base:held:sum`), changed together only here, so a
-- check reads one number however many holds are in flight.
local function drop_lapsed(held_key)
  local lapsed = redis.call('ZRANGEBYSCORE', held_key, '-inf', now_ms)
  if #lapsed == 0 then return end
  local gone = 0
  for _, member in ipairs(lapsed) do
    gone = gone + tonumber(string.match(member, '|(%d+)$'))
  end
  redis.call('ZREMRANGEBYSCORE', held_key, '-inf', now_ms)
  if redis.call('DECRBY', held_key .. ':sum', gone) <= 0 then
    redis.call('DEL', held_key .. ':sum')
  end
end
local function unhold(held_key, member, amount)
  if redis.call('ZREM', held_key, member) == 1 then
    if redis.call('DECRBY', held_key .. ':sum', amount) <= 0 then
      redis.call('DEL', held_key .. ':sum')
    end
  end
end
local function hold(held_key, member, amount, ends, ttl)
  redis.call('ZADD', held_key, now_ms + ttl, member)
  if redis.call('INCRBY', held_key .. ':sum', amount) == amount then
    -- Created now: the window's holds all lapse by its end plus a hold's TTL.
    local gone_at = ends + math.ceil(ttl / 1000) + 1
    redis.call('EXPIREAT', held_key, gone_at)
    redis.call('EXPIREAT', held_key .. ':sum', gone_at)
  end
end
-- `_index`: the scope:unit:window combinations some budget uses (BudgetAdmin keeps it),
-- so only those are looked up; without it, every combination.
local combos = {}
if index then
  for scope, u, w in string.gmatch(index, '([^,:]+):([^,:]+):([^,:]+)') do
    local list = combos[scope] or {}
    list[#list + 1] = {u, w}
    combos[scope] = list
  end
end
local every = {}
if not index then
  local units = {'tokens', 'micros', 'seconds'}
  local windows = {'minute', 'day', 'month'}
  for _, u in ipairs(units) do
    for _, w in ipairs(windows) do every[#every + 1] = {u, w} end
  end
end
local fields, meta = {}, {}
for i = first_pair, #ARGV, 2 do
  local scope, subject = ARGV[i], ARGV[i + 1]
  for _, c in ipairs(index and (combos[scope] or {}) or every) do
    local u, w = c[1], c[2]
    if est[u] ~= nil then
      fields[#fields + 1] = scope .. ':' .. subject .. ':' .. u .. ':' .. w
      fields[#fields + 1] = scope .. ':*:' .. u .. ':' .. w
      meta[#meta + 1] = {scope, subject, u, w}
    end
  end
end
if #fields == 0 then return {0} end
local values = redis.call('HMGET', cfg, unpack(fields))
"""


# ARGV: reservation id, ttl_ms, estimate tokens, estimate micros, then (scope, subject)
# pairs. Returns {0, counters...} (base key, unit, window end s, amount per counter) or
# {1, name, limit, remaining, reset_s} when a budget would be exceeded.
_RESERVE_LUA: Final = (
    "local est = {tokens = tonumber(ARGV[3]), micros = tonumber(ARGV[4])}\n"
    "local first_pair = 5\n"
    + _LOOKUP_LUA
    + r"""
local id, ttl = ARGV[1], tonumber(ARGV[2])
local applied = {}
for j, m in ipairs(meta) do
  local limit = tonumber(values[2 * j - 1] or '') or tonumber(values[2 * j] or '')
  if limit then
    local idx, ends = window(m[4])
    local base = 'kv:budget:{budget}:' .. m[1] .. ':' .. m[2] .. ':' .. m[3] .. ':'
      .. m[4] .. ':' .. idx
    -- Holds that lapsed (never settled) still count in the sum until a check would
    -- refuse: then they are dropped and the check is made again.
    local held_key = base .. ':held'
    local sum_key = held_key .. ':sum'
    local counts = redis.call('MGET', sum_key, base)
    local held = math.max(tonumber(counts[1] or '0'), 0)
    local used = tonumber(counts[2] or '0')
    local need = est[m[3]]
    if used + held + need > limit then
      drop_lapsed(held_key)
      held = math.max(tonumber(redis.call('GET', sum_key) or '0'), 0)
    end
    if used + held + need > limit then
      local name = m[1] .. '-' .. m[3] .. '-' .. m[4]
      return {1, name, limit, math.max(limit - used - held, 0), ends - sec}
    end
    applied[#applied + 1] = {base, m[3], ends, need}
  end
end
local out = {0}
for _, a in ipairs(applied) do
  if a[4] > 0 then hold(a[1] .. ':held', id .. '|' .. a[4], a[4], a[3], ttl) end
  out[#out + 1] = a[1]
  out[#out + 1] = a[2]
  out[#out + 1] = a[3]
  out[#out + 1] = a[4]
end
return out
"""
)

# The reservation as the admission script's rider (shared.ratelimit.admission_with): one
# script, one round trip, all-or-nothing with the block, revocation, nonce and rate-limit
# checks. The combined script's KEYS: block, revoked token ("" unused), nonce ("" unused),
# revoked user ("" unused), one per rate-limit layer, then CONFIG_KEY (last); its ARGV:
# nonce ttl ms, token iat, (period us, limit) per layer, then this script's ARGV. The
# counter and hold keys are built in the script from the configuration (all `{budget}`).
ADMISSION_RIDER: Final = _RESERVE_LUA

# ARGV, per hold: reservation id, actual tokens, actual micros, the number of counters,
# then (base, unit, window end s, reserved amount) per counter. Drops the reservations,
# adds the real usage (a counter's expiry is set when this creates it). Many holds per
# call: settlements are batched (`Budgets.settle_soon`).
_SETTLE_LUA: Final = r"""
local i = 1
while i <= #ARGV do
  local id = ARGV[i]
  local actual = {tokens = tonumber(ARGV[i + 1]), micros = tonumber(ARGV[i + 2])}
  local last = i + 3 + 4 * tonumber(ARGV[i + 3])
  for c = i + 4, last, 4 do
    local base, unit, ends, amount = ARGV[c], ARGV[c + 1], ARGV[c + 2], ARGV[c + 3]
    if redis.call('ZREM', base .. ':held', id .. '|' .. amount) == 1 then
      local sum_key = base .. ':held:sum'
      if redis.call('DECRBY', sum_key, amount) <= 0 then redis.call('DEL', sum_key) end
    end
    local add = actual[unit]
    if add > 0 and redis.call('INCRBY', base, add) == add then
      redis.call('EXPIREAT', base, tonumber(ends) + 3600)
    end
  end
  i = last + 1
end
return 1
"""


# A live voice session's rolling hold. A session holds `ahead` (per unit) beyond what it
# has used, under a hold id of its own, so concurrent sessions share the room left:
#   open     the whole `ahead` must fit every budget, else nothing is held ({1, ...}
#            as the reserve script answers);
#   tick     `used` is added to the counters (once per event id: a replica that takes
#            the session over replays its outbox under the same id), the hold shrinks by
#            it and is topped up to `ahead` from the room left; `short` when it could
#            not be: the session must end, and what it still holds covers its close;
#   release  the session ended: its hold is dropped.
# ARGV: hold id, ttl_ms, used tokens|micros|seconds, ahead tokens|micros|seconds (a unit
# this session does not bill is '' and its budgets are not looked up), mode, event id
# ('' for none), then (scope, subject) pairs. Returns {0} (no budget applies), the
# refusal, or {0, permille of the fullest budget (committed + held) / limit, its name,
# 1 when short, the budget it ran short on}.
_VOICE_LUA: Final = (
    "local est = {tokens = tonumber(ARGV[3]), micros = tonumber(ARGV[4]),"
    " seconds = tonumber(ARGV[5])}\n"
    "local first_pair = 11\n"
    + _LOOKUP_LUA
    + r"""
local id, ttl, mode, event = ARGV[1], tonumber(ARGV[2]), ARGV[9], ARGV[10]
local ahead = {tokens = tonumber(ARGV[6]) or 0, micros = tonumber(ARGV[7]) or 0,
  seconds = tonumber(ARGV[8]) or 0}
local fresh = true
if mode == 'tick' and event ~= '' then
  fresh = redis.call('SET', 'kv:budget:{budget}:seen:' .. event, '1', 'NX', 'EX', 172800)
    ~= false
end
local found = {}
for j, m in ipairs(meta) do
  local limit = tonumber(values[2 * j - 1] or '') or tonumber(values[2 * j] or '')
  if limit then
    local idx, ends = window(m[4])
    local base = 'kv:budget:{budget}:' .. m[1] .. ':' .. m[2] .. ':' .. m[3] .. ':'
      .. m[4] .. ':' .. idx
    local held_key = base .. ':held'
    drop_lapsed(held_key)
    local others, own, own_member = 0, 0, ''
    for _, member in ipairs(redis.call('ZRANGE', held_key, 0, -1)) do
      local who, amount = string.match(member, '^(.*)|(%d+)$')
      if who == id then own, own_member = tonumber(amount), member
      else others = others + tonumber(amount) end
    end
    local used = tonumber(redis.call('GET', base) or '0')
    local name = m[1] .. '-' .. m[3] .. '-' .. m[4]
    if mode == 'open' and used + others + ahead[m[3]] > limit then
      return {1, name, limit, math.max(limit - used - others, 0), ends - sec}
    end
    found[#found + 1] = {base, held_key, m[3], ends, limit, used, others, own, own_member, name}
  end
end
if #found == 0 then return {0} end
local worst, worst_name, short, short_name = 0, '', 0, ''
for _, f in ipairs(found) do
  local base, held_key, unit, ends, limit, used, others, own, own_member, name = unpack(f)
  local want = ahead[unit]
  local keep = 0
  if mode == 'open' then
    keep = want
  elseif mode == 'tick' then
    local add = fresh and est[unit] or 0
    if add > 0 then used = redis.call('INCRBY', base, add) end
    redis.call('EXPIREAT', base, ends + 3600)
    local left = math.max(own - add, 0)
    keep = math.max(left, math.min(want, limit - used - others))
    if keep < want then short, short_name = 1, name end
  end
  if own_member ~= '' then unhold(held_key, own_member, own) end
  if keep > 0 then hold(held_key, id .. '|' .. keep, keep, ends, ttl) end
  local permille = limit > 0 and math.floor(1000 * (used + others + keep) / limit) or 1000
  if permille >= worst then worst, worst_name = permille, name end
end
return {0, worst, worst_name, short, short_name}
"""
)


@dataclass(frozen=True, slots=True)
class Metered:
    """Voice amounts per unit; None: the session does not bill that unit (Realtime bills
    no seconds, GPT-Live no tokens), so its budgets do not apply."""

    tokens: int | None = None
    micros: int | None = None
    seconds: int | None = None

    def args(self) -> list[Any]:
        return ["" if v is None else max(v, 0) for v in (self.tokens, self.micros, self.seconds)]


@dataclass(frozen=True, slots=True)
class VoiceCharge:
    """The fullest budget after a voice tick: its share (committed + held) / limit, its
    name, and the budget the session ran short on (None: its hold is whole)."""

    share: float
    name: str
    short: str | None


@dataclass(frozen=True, slots=True)
class Estimate:
    """The most one call can use: what is reserved before it goes upstream."""

    tokens: int
    micros: int


@dataclass(frozen=True, slots=True)
class Hold:
    """A reservation to settle when the answer ends (or to let expire).

    `counters`: what the reserve script answered, as it came (base key, unit, window
    end, amount per counter held), sent back as is to settle: never decoded."""

    id: str
    counters: tuple[bytes | str | int, ...]
    estimate: Estimate


@dataclass(frozen=True, slots=True)
class Claim:
    """A reservation to make inside the admission round trip (`Budgets.claim`)."""

    id: str
    estimate: Estimate
    rider: RiderCall


class BudgetExceeded(Exception):
    """One budget would be passed: its name, limit, what is left and when it resets."""

    def __init__(self, name: str, limit: int, remaining: int, reset_s: int) -> None:
        self.name, self.limit, self.remaining, self.reset_s = name, limit, remaining, reset_s
        super().__init__(name)

    def headers(self) -> dict[str, str]:
        window = self.name.rsplit("-", 1)[-1]
        w = 60 if window == "minute" else 86_400 if window == "day" else 30 * 86_400
        return {
            "RateLimit-Policy": f'"budget-{self.name}";q={self.limit};w={w}',
            "RateLimit": f'"budget-{self.name}";r={self.remaining};t={self.reset_s}',
            "Retry-After": str(max(1, self.reset_s)),
        }


class BudgetUnavailable(Exception):
    """Redis could not be asked, and the failure mode is closed."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# The most holds settled in one script call.
_SETTLE_BATCH = 128
_SETTLE_RETRY_S = 0.2


class Budgets:
    """Reserve and settle against the budgets in Redis (see the module docstring).

    Two ways to reserve: `reserve`, a round trip of its own, or `claim` + `held`, inside
    the admission script (`ADMISSION_RIDER`, given to `shared.ratelimit.Admission`).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        hold_ttl_s: float = 300.0,
        failure_mode: Literal["closed", "open"] = "closed",
        deadline_s: float = 1.5,
        pipelined: bool = False,
    ) -> None:
        """`pipelined=True`: each script over one pipelined connection of its own
        (shared.ratelimit.PipelinedScript, far cheaper per call); `aclose()` when done."""
        self._redis = redis
        self._reserve: Any = redis.register_script(_RESERVE_LUA)
        self._settle: Any = redis.register_script(_SETTLE_LUA)
        self._voice: Any = redis.register_script(_VOICE_LUA)
        self._pipes: list[PipelinedScript] = []
        if pipelined:
            reserve = PipelinedScript.for_client(redis, _RESERVE_LUA)
            settle = PipelinedScript.for_client(redis, _SETTLE_LUA)
            if reserve is not None and settle is not None:
                self._reserve, self._settle = reserve, settle
                self._pipes = [reserve, settle]
        self._ttl_ms = max(1, int(hold_ttl_s * 1000))
        self._mode = failure_mode
        self._deadline_s = deadline_s
        # Hold ids: unique per process (a random prefix) and cheap (a counter).
        self._id_prefix = secrets.token_hex(6)
        self._ids = itertools.count()
        self._pending: list[list[Any]] = []  # the settle ARGV of each queued hold
        self._settling: asyncio.Task[None] | None = None

    @property
    def failure_mode(self) -> Literal["closed", "open"]:
        return self._mode

    def _args(self, hold_id: str, subjects: list[tuple[str, str]], estimate: Estimate) -> list[Any]:
        args: list[Any] = [hold_id, self._ttl_ms, estimate.tokens, estimate.micros]
        for scope, subject in subjects:
            args += [scope, subject]
        return args

    def claim(self, *, subjects: list[tuple[str, str]], estimate: Estimate) -> Claim:
        """What to give `Admission.check(rider=...)` to reserve `estimate` in its round trip."""
        hold_id = f"{self._id_prefix}{next(self._ids):x}"
        return Claim(
            hold_id, estimate, RiderCall(CONFIG_KEY, self._args(hold_id, subjects, estimate))
        )

    def held(self, claim: Claim, decision: Decision) -> Hold | None:
        """The outcome of a claim: its Hold (None: no budget applies, or Redis was away and
        the mode is open); raises BudgetExceeded or BudgetUnavailable. Call it only for an
        admitted decision or one its rider refused."""
        if decision.rider is None:
            if not decision.fallback:
                raise ValueError("the admission refused before the budgets were asked")
            # Redis could not be asked (the admission's fallback let the call through).
            _UNAVAILABLE.inc()
            if self._mode == "open":
                return None
            raise BudgetUnavailable()
        return self._outcome(
            claim.id, claim.estimate, decision.rider, refused=decision.rider_refused
        )

    async def reserve(self, *, subjects: list[tuple[str, str]], estimate: Estimate) -> Hold | None:
        """A hold on every budget that applies, in a round trip of its own (None: none
        applies, or Redis is away and the mode is open); raises BudgetExceeded or
        BudgetUnavailable."""
        hold_id = f"{self._id_prefix}{next(self._ids):x}"
        try:
            with redis_unavailable():
                async with asyncio.timeout(self._deadline_s):
                    raw = await self._reserve(
                        keys=[CONFIG_KEY], args=self._args(hold_id, subjects, estimate)
                    )
        except RedisUnavailableError as exc:
            if exc.reply_code is None:
                self._reset()
            _UNAVAILABLE.inc()
            if self._mode == "open":
                return None
            raise BudgetUnavailable() from None
        return self._outcome(hold_id, estimate, raw[1:], refused=int(raw[0]) == 1)

    @staticmethod
    def _outcome(
        hold_id: str, estimate: Estimate, items: Sequence[Any], *, refused: bool
    ) -> Hold | None:
        """The reserve script's answer after its status: a refusal, or the counters held."""
        if refused:
            _EXCEEDED.inc()
            raise BudgetExceeded(_text(items[0]), int(items[1]), int(items[2]), int(items[3]))
        if not items:
            _NONE.inc()
            return None
        _RESERVED.inc()
        return Hold(hold_id, tuple(items), estimate)

    @staticmethod
    def _settle_args(hold: Hold, tokens: int, micros: int) -> list[Any]:
        return [hold.id, max(tokens, 0), max(micros, 0), len(hold.counters) // 4, *hold.counters]

    async def settle(self, hold: Hold, *, tokens: int, micros: int) -> None:
        """Drop the reservation and count what was really used, now (retried once)."""
        await self._send_settlements(self._settle_args(hold, tokens, micros))

    def settle_soon(self, hold: Hold, *, tokens: int, micros: int) -> None:
        """`settle`, off the caller's path: queued, and sent with the others queued
        meanwhile in one script call (one in flight at a time). `flush` waits for them."""
        self._pending.append(self._settle_args(hold, tokens, micros))
        if self._settling is None:
            self._settling = asyncio.get_running_loop().create_task(self._settle_pending())

    async def _settle_pending(self) -> None:
        try:
            while self._pending:
                await asyncio.sleep(0)  # the settlements of this loop turn join in
                batch = self._pending[:_SETTLE_BATCH]
                del self._pending[:_SETTLE_BATCH]
                try:
                    await self._send_settlements([arg for args in batch for arg in args])
                except RedisUnavailableError as exc:
                    # The reservations lapse by their TTL; the real usage is not counted.
                    log.error("%d budget settlements lost, redis unavailable (%s)", len(batch), exc)
        finally:
            self._settling = None

    async def _send_settlements(self, args: list[Any]) -> None:
        for attempt in (1, 2):
            try:
                with redis_unavailable():
                    async with asyncio.timeout(self._deadline_s):
                        await self._settle(keys=[CONFIG_KEY], args=args)
                return
            except RedisUnavailableError as exc:
                if exc.reply_code is None:
                    self._reset()
                if attempt == 2:
                    raise
                await asyncio.sleep(_SETTLE_RETRY_S)

    async def flush(self) -> None:
        """Wait until every queued settlement was sent (or given up)."""
        while self._settling is not None:
            await asyncio.shield(self._settling)

    async def voice(
        self,
        *,
        hold_id: str,
        subjects: list[tuple[str, str]],
        mode: Literal["open", "tick", "release"],
        used: Metered = Metered(),
        ahead: Metered = Metered(),
        event_id: str = "",
        ttl_s: float = 60.0,
    ) -> VoiceCharge | None:
        """A live voice session's rolling hold (see `_VOICE_LUA`); None when no budget
        applies. `open` raises BudgetExceeded; every mode raises RedisUnavailableError."""
        args: list[Any] = [hold_id, max(1, int(ttl_s * 1000)), *used.args(), *ahead.args()]
        args += [mode, event_id]
        for scope, subject in subjects:
            args += [scope, subject]
        with redis_unavailable():
            async with asyncio.timeout(self._deadline_s):
                raw = await self._voice(keys=[CONFIG_KEY], args=args)
        if int(raw[0]) == 1:
            DECISIONS.labels("exceeded").inc()
            raise BudgetExceeded(_text(raw[1]), int(raw[2]), int(raw[3]), int(raw[4]))
        if mode == "open":
            DECISIONS.labels("reserved" if len(raw) >= 5 else "none").inc()
        if len(raw) < 5:
            return None
        return VoiceCharge(
            int(raw[1]) / 1000, _text(raw[2]), _text(raw[4]) if int(raw[3]) else None
        )

    def _reset(self) -> None:
        for pipe in self._pipes:
            pipe.reset()  # a stuck or broken connection is not reused

    async def aclose(self) -> None:
        """Send what is queued, then close the pipelined connections."""
        await self.flush()
        for pipe in self._pipes:
            await pipe.aclose()


def window_index(window: str, now: float) -> int:
    """The window a moment falls in, as the reserve script numbers it (UTC)."""
    if window == "minute":
        return int(now // 60)
    if window == "day":
        return int(now // 86_400)
    moment = time.gmtime(now)
    return moment.tm_year * 12 + moment.tm_mon - 1


def counter_key(scope: str, subject: str, unit: str, window: str, index: int) -> str:
    return f"kv:budget:{{budget}}:{scope}:{subject}:{unit}:{window}:{index}"


@dataclass(frozen=True, slots=True)
class BudgetState:
    scope: str
    subject: str
    unit: str
    window: str
    limit: int
    used: int
    held: int


class BudgetAdmin:
    """What `keyveil budgets set|show|reset` does, on the same keys as the scripts."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    async def set(self, scope: str, subject: str, unit: str, window: str, limit: int) -> None:
        if scope not in SCOPES or unit not in UNITS or window not in WINDOWS or limit < 0:
            raise ValueError("scope, unit, window or limit is not valid")
        await self._redis.hset(CONFIG_KEY, budget_field(scope, subject, unit, window), limit)
        await self._reindex()

    async def remove(self, scope: str, subject: str, unit: str, window: str) -> bool:
        removed = await self._redis.hdel(CONFIG_KEY, budget_field(scope, subject, unit, window))
        await self._reindex()
        return bool(removed)

    async def _reindex(self) -> None:
        """Write `_index`, the combinations in use, so the scripts look up only those."""
        combos: set[str] = set()
        for raw in await self._redis.hkeys(CONFIG_KEY):
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            if text == INDEX_FIELD:
                continue
            scope, rest = text.split(":", 1)
            _, unit, window = rest.rsplit(":", 2)
            combos.add(f"{scope}:{unit}:{window}")
        if combos:
            await self._redis.hset(CONFIG_KEY, INDEX_FIELD, ",".join(sorted(combos)))
        else:
            await self._redis.delete(CONFIG_KEY)

    async def show(self, now: float | None = None) -> list[BudgetState]:
        moment = time.time() if now is None else now
        out = []
        for raw_field, raw_limit in sorted((await self._redis.hgetall(CONFIG_KEY)).items()):
            text = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
            if text == INDEX_FIELD:
                continue
            scope, rest = text.split(":", 1)
            subject, unit, window = rest.rsplit(":", 2)
            key = counter_key(scope, subject, unit, window, window_index(window, moment))
            used = int(await self._redis.get(key) or 0)
            now_ms = int(moment * 1000)
            members: list[bytes] = await self._redis.zrangebyscore(  # type: ignore[assignment]
                f"{key}:held", now_ms, "+inf"
            )
            held = sum(int(bytes(m).rsplit(b"|", 1)[1]) for m in members)
            out.append(BudgetState(scope, subject, unit, window, int(raw_limit), used, held))
        return out

    async def reset(self, scope: str, subject: str) -> int:
        """Forget the usage counted against one subject's budgets (every window)."""
        removed = 0
        pattern = f"kv:budget:{{budget}}:{scope}:{subject}:*"
        async for key in self._redis.scan_iter(match=pattern, count=500):
            removed += int(await self._redis.delete(key))
        return removed
