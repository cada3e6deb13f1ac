"""Distributed admission control: GCRA rate limits, replay nonces, revocations, IP blocks.

Every replica asks Redis, in one round trip (one Lua script), whether a request may
pass: refuse if the client IP is blocked, if the token id is revoked, if the nonce
was seen before, else apply every rate-limit layer atomically. A refused layer
consumes nothing, so N replicas enforce one limit, not N. A rider (`admission_with`:
shared.budgets' reservation) can run in the same script, all or nothing with it.

GCRA (generic cell rate algorithm) with `limit` per `period_s` and a burst of
`limit`: emission interval T = period/limit, and the stored "theoretical arrival
time" (TAT) moves T forward per admitted request; a request is refused while
TAT + T - now > period. Time comes from Redis (`TIME`), so replicas need no clock sync.

When Redis is unreachable each layer follows its `FailureMode`: `closed` refuses
(callers answer 503), `open` admits, `local` applies the same GCRA in process.
The Redis client must have socket timeouts (`redis_client`), so nothing hangs.

"Unreachable" includes a server that answers but cannot serve: full (`OOM` under
`noeviction`), loading, busy with a script, a read-only replica, a cluster or
replication problem. `redis_unavailable` is the one place that decides what counts:

    RedisUnavailableError (a redis ConnectionError)
      <- ConnectionError, TimeoutError, OSError, asyncio's TimeoutError
      <- a ResponseError whose code is OOM, LOADING, BUSY, MASTERDOWN, READONLY,
         CLUSTERDOWN, TRYAGAIN or NOREPLICAS (redis-py's classes for them, or a raw
         reply from `PipelinedScript`)
      <- the cluster client's ClusterError, SlotNotCoveredError, "cannot be connected"
    anything else (a script bug, a wrong type) is raised unchanged: a bug, not an outage.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Final

import redis.asyncio as aioredis
import redis.exceptions
from prometheus_client import Counter
from redis.asyncio.connection import Connection as _TcpConnection
from redis.asyncio.connection import SSLConnection as _SslConnection
from redis.asyncio.sentinel import SentinelConnectionPool, SentinelManagedSSLConnection

from shared.clusteradmission import SlotGroupedAdmission
from shared.coalesce import CoalescedWrites
from shared.contract import Category, Refusal
from shared.principals import revoked_user_key
from shared.redistopology import RedisTopology, cluster_of, connect
from shared.tokens import revoked_key

__all__ = [
    "Admission",
    "Decision",
    "FailureMode",
    "Limit",
    "LocalGcra",
    "PipelinedScript",
    "RedisUnavailableError",
    "RiderCall",
    "admission_with",
    "as_unavailable",
    "block_key",
    "nonce_key",
    "rate_key",
    "redis_client",
    "redis_unavailable",
    "strikes_key",
]

log = logging.getLogger(__name__)

DECISIONS = Counter(
    "keyveil_ratelimit_decisions_total",
    "Admission decisions per layer (result: allowed|limited|blocked|unavailable)",
    ["service", "layer", "result"],
)
BACKEND_ERRORS = Counter(
    "keyveil_ratelimit_backend_errors_total",
    "Admission checks that could not reach Redis",
    ["service"],
)

_US: Final = 1_000_000
# Refusal codes returned by the Lua script, in the order the checks run.
_OK, _LIMITED, _REPLAY, _REVOKED, _BLOCKED, _RIDER_REFUSED = 0, 1, 2, 3, 4, 5
_REFUSALS: Final[dict[int, Refusal | None]] = {
    _OK: None,
    _RIDER_REFUSED: None,  # the rider's owner names its refusal
    _LIMITED: Refusal.RATE_LIMITED,
    _REPLAY: Refusal.REPLAY_DETECTED,
    _REVOKED: Refusal.TOKEN_REVOKED,
    _BLOCKED: Refusal.IP_BLOCKED,
}
# Categories whose answer carries Retry-After: they pass with time.
_RETRYABLE: Final = frozenset({Category.limit, Category.blocked, Category.unavailable})
# Metric layer names for the checks that are not rate-limit layers.
_CHECK_LAYERS: Final = {_REPLAY: "nonce", _REVOKED: "revocation", _BLOCKED: "block"}
_REDIS_TROUBLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
    TimeoutError,
)
# Error replies that mean "cannot serve now", not "this command is wrong". NOPERM is
# here too: a Redis ACL that does not let this service write a key it must (a
# least-privilege login set up too tight) is the server refusing, not the client's fault.
# MOVED and ASK here are redirects still coming after the cluster path followed them
# (shared.clusteradmission): a slot map in flux, which passes.
_UNAVAILABLE_REPLIES: Final = frozenset(
    {
        "MOVED",
        "ASK",
        "OOM",
        "LOADING",
        "BUSY",
        "MASTERDOWN",
        "READONLY",
        "CLUSTERDOWN",
        "TRYAGAIN",
        "NOREPLICAS",
        "NOPERM",
    }
)

# redis-py's classes for some of them (it moves the code into `status_code`).
_UNAVAILABLE_CLASSES = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ClusterDownError,  # and MasterDownError
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterError,  # a cluster command's retries ran out
    redis.exceptions.SlotNotCoveredError,  # a slot's master is gone, no failover yet
)
# redis-py's cluster client raises these (not RedisErrors) when no node answers.
_CLUSTER_UNREACHABLE: Final = ("Redis Cluster cannot be connected", "All slots are not covered")


class RedisUnavailableError(redis.exceptions.ConnectionError):
    """Redis cannot serve now: unreachable, timed out, or refusing (full, loading, ...)."""

    def __init__(self, cause: BaseException) -> None:
        self.cause_name = type(cause).__name__
        self.reply_code = (
            _reply_code(cause) if isinstance(cause, redis.exceptions.RedisError) else None
        )
        super().__init__(self.reply_code or self.cause_name)


def _reply_code(exc: redis.exceptions.RedisError) -> str | None:
    # redis-py strips the code it knows into `status_code`; a raw reply keeps it first.
    code = getattr(exc, "status_code", None)
    if isinstance(code, str) and code:
        return code
    first = str(exc).split(" ", 1)[0]
    return first if first.isupper() else None


def as_unavailable(exc: BaseException) -> RedisUnavailableError | None:
    """The outage `exc` stands for, or None when it is not one (see the module docstring)."""
    if isinstance(exc, RedisUnavailableError):
        return exc
    if isinstance(exc, _REDIS_TROUBLE):
        return RedisUnavailableError(exc)
    if isinstance(exc, _UNAVAILABLE_CLASSES) or (
        isinstance(exc, redis.exceptions.ResponseError) and _reply_code(exc) in _UNAVAILABLE_REPLIES
    ):
        return RedisUnavailableError(exc)
    if isinstance(exc, redis.exceptions.RedisClusterException) and str(exc).startswith(
        _CLUSTER_UNREACHABLE
    ):
        return RedisUnavailableError(exc)
    return None


@contextmanager
def redis_unavailable() -> Iterator[None]:
    """Raise `RedisUnavailableError` for every Redis outage inside the block."""
    try:
        yield
    except (
        redis.exceptions.RedisError,
        redis.exceptions.RedisClusterException,
        OSError,
        TimeoutError,
    ) as exc:
        outage = as_unavailable(exc)
        if outage is None:
            raise
        raise outage from None


# KEYS: block, revoked ("" when unused), nonce ("" when unused), revoked user ("" when
# unused), then one per layer. (A cluster slot group passes a key of its own slot that
# never exists instead of "": shared.clusteradmission.)
# ARGV: nonce_ttl_ms (0: no nonce), token iat (s; a user's tokens issued at or before the
# stored time are revoked), then (period_us, limit) per layer.
# Returns {code, layer_index (1-based, 0 = none), remaining, reset_after_us, retry_after_us};
# the plain script, when admitted, then the new TAT of every layer (what a cluster refund
# compares: shared.clusteradmission).
# The checks come first and write nothing; `n` (the number of layers) is set before them.
_ADMIT_CHECKS_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if redis.call('EXISTS', KEYS[1]) == 1 then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl < 0 then ttl = 0 end
  return {4, 0, 0, ttl * 1000, ttl * 1000}
end
if KEYS[2] ~= '' and redis.call('EXISTS', KEYS[2]) == 1 then
  return {3, 0, 0, 0, 0}
end
if KEYS[4] ~= '' then
  local cut = tonumber(redis.call('GET', KEYS[4]) or '')
  if cut and tonumber(ARGV[2]) <= cut then
    return {3, 0, 0, 0, 0}
  end
end
local nonce = KEYS[3] ~= '' and tonumber(ARGV[1]) > 0
if nonce and redis.call('EXISTS', KEYS[3]) == 1 then
  return {2, 0, 0, 0, 0}
end
local new_tats = {}
local best, best_remaining, best_reset = 0, -1, 0
for i = 1, n do
  local period = tonumber(ARGV[2 * i + 1])
  local limit = tonumber(ARGV[2 * i + 2])
  local interval = period / limit
  local tat = tonumber(redis.call('GET', KEYS[4 + i]) or '0')
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - period
  -- 1 us of slack: period/limit is rarely exact, and a full burst must still fit.
  if now < allow_at - 1 then
    return {1, i, 0, math.floor(tat - now), math.ceil(allow_at - now)}
  end
  new_tats[i] = new_tat
  local remaining = math.floor((period - (new_tat - now)) / interval + 1e-6)
  if best_remaining < 0 or remaining < best_remaining then
    best, best_remaining, best_reset = i, remaining, math.ceil(new_tat - now)
  end
end
"""
# Every check passed: consume the layers and the nonce.
_ADMIT_WRITES_LUA: Final = """
local stored_tats = {}
for i = 1, n do
  local ttl_ms = math.max(1, math.ceil((new_tats[i] - now) / 1000))  -- >0 below float precision
  stored_tats[i] = string.format('%.17g', new_tats[i])
  redis.call('SET', KEYS[4 + i], stored_tats[i], 'PX', ttl_ms)
end
if nonce then
  redis.call('SET', KEYS[3], '1', 'PX', tonumber(ARGV[1]))
end
if best_remaining < 0 then best_remaining = 0 end
"""
_ADMIT_LUA: Final = (
    "local n = #KEYS - 4\n"
    + _ADMIT_CHECKS_LUA
    + _ADMIT_WRITES_LUA
    + "return {0, best, best_remaining, best_reset, 0, unpack(stored_tats)}\n"
)


def admission_with(rider: str) -> str:
    """The admission script with `rider` inside it, all-or-nothing (see `Admission`).

    KEYS: the admission's (block, revoked, nonce, revoked user, one per layer), then the
    rider's one key, last. ARGV: the admission's (nonce ttl, iat, two per layer), then
    the rider's. The rider is Lua run as a function of its own KEYS (that one key) and
    ARGV, once every admission check passed and before the admission writes anything;
    it returns {0, data...} to go on or {1, data...} to refuse. Returns the admission's
    five items, then the rider's data; code 5 when the rider refused (nothing written
    by the admission: no layer or nonce consumed).
    """
    return (
        "local function rider(KEYS, ARGV)\n"
        + rider
        + "\nend\nlocal n = #KEYS - 5\n"
        + _ADMIT_CHECKS_LUA
        + "local ridden = rider({KEYS[#KEYS]}, {unpack(ARGV, 3 + 2 * n)})\n"
        + "if ridden[1] ~= 0 then return {5, 0, 0, 0, 0, unpack(ridden, 2)} end\n"
        + _ADMIT_WRITES_LUA
        + "return {0, best, best_remaining, best_reset, 0, unpack(ridden, 2)}\n"
    )


# KEYS: strikes, block. ARGV: threshold, window_ms, block_ms. Returns 1 when this strike blocked.
_STRIKE_LUA: Final = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2])) end
if count >= tonumber(ARGV[1]) then
  redis.call('SET', KEYS[2], '1', 'PX', tonumber(ARGV[3]))
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


# Every key names its subject as a Cluster hash tag ({subject}): what one check must
# change atomically shares a slot (docs/redis.md has the key table).


def rate_key(layer: str, subject: str) -> str:
    return f"kv:rl:{layer}:{{{subject}}}"


def nonce_key(nonce: str) -> str:
    """`nonce` is whatever must be unique, e.g. f"{keyid}:{nonce}"; the part before the
    first ':' is its subject (the token id: its slot holds the token's other keys)."""
    subject, _, rest = nonce.partition(":")
    return f"kv:nonce:{{{subject}}}:{rest}"


def block_key(client_ip: str) -> str:
    return f"kv:block:{{{client_ip}}}"


def strikes_key(client_ip: str) -> str:
    return f"kv:strikes:{{{client_ip}}}"


def redis_client(url: str, timeout_s: float = 0.5) -> aioredis.Redis:
    """A standalone Redis client that cannot hang (shared.redistopology has the others)."""
    return connect(RedisTopology(url, timeout_s))


@dataclass(frozen=True)
class Limit:
    """`limit` requests per `period_s` for `subject` (an IP, a token id) in `layer`."""

    layer: str
    subject: str
    limit: int
    period_s: float

    def __post_init__(self) -> None:
        if self.limit < 1 or self.period_s <= 0:
            raise ValueError("a limit needs limit >= 1 and period_s > 0")


@dataclass(frozen=True)
class Decision:
    """The answer to one admission check, with the headers a response should carry."""

    allowed: bool
    refusal: Refusal | None = None  # None when allowed
    layer: str | None = None
    limit: int | None = None
    remaining: int | None = None
    reset_after_s: float = 0.0
    retry_after_s: float = 0.0
    window_s: float | None = None
    # What the admission's rider answered (`Admission(rider=...)`): its data after its
    # status, None when it did not run (no rider, an admission check refused first, or
    # Redis could not be asked).
    rider: tuple[Any, ...] | None = None
    rider_refused: bool = False
    # Redis could not be asked: this is the failure mode's decision.
    fallback: bool = False

    def headers(self) -> dict[str, str]:
        """IETF httpapi RateLimit-Policy / RateLimit, and Retry-After when refused."""
        out: dict[str, str] = {}
        if self.layer is not None and self.limit is not None and self.window_s is not None:
            out["RateLimit-Policy"] = f'"{self.layer}";q={self.limit};w={math.ceil(self.window_s)}'
            out["RateLimit"] = (
                f'"{self.layer}";r={self.remaining or 0};t={math.ceil(self.reset_after_s)}'
            )
        if self.refusal is not None and self.refusal.category in _RETRYABLE:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return out


class FailureMode(StrEnum):
    """What a layer does while Redis is unreachable."""

    closed = "closed"
    open = "open"
    local = "local"


class LocalGcra:
    """The same GCRA in process: the `local` fallback, and the arithmetic in plain sight."""

    def __init__(
        self, *, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._tats: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._max = max_entries
        self._clock = clock

    def check(self, limits: Sequence[Limit]) -> Decision:
        """All-or-nothing over `limits`, like the Redis script."""
        now = self._clock()
        updates: list[tuple[tuple[str, str], float]] = []
        best: Decision | None = None
        for item in limits:
            interval = item.period_s / item.limit
            tat = max(self._tats.get((item.layer, item.subject), now), now)
            new_tat = tat + interval
            allow_at = new_tat - item.period_s
            if now < allow_at - 1e-6:  # the script's 1 us of float slack
                return Decision(
                    allowed=False,
                    refusal=Refusal.RATE_LIMITED,
                    layer=item.layer,
                    limit=item.limit,
                    remaining=0,
                    reset_after_s=tat - now,
                    retry_after_s=allow_at - now,
                    window_s=item.period_s,
                )
            remaining = math.floor((item.period_s - (new_tat - now)) / interval + 1e-6)
            updates.append(((item.layer, item.subject), new_tat))
            if best is None or remaining < (best.remaining or 0):
                best = Decision(
                    allowed=True,
                    layer=item.layer,
                    limit=item.limit,
                    remaining=remaining,
                    reset_after_s=new_tat - now,
                    window_s=item.period_s,
                )
        for key, new_tat in updates:
            self._tats[key] = new_tat
            self._tats.move_to_end(key)
        while len(self._tats) > self._max:
            self._tats.popitem(last=False)
        return best or Decision(allowed=True)


class _LocalNonces:
    """Seen nonces while Redis is away, so a fallback does not reopen replays."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._max = max_entries

    def first_use(self, nonce: str, ttl_s: int) -> bool:
        now = time.monotonic()
        expiry = self._seen.get(nonce)
        if expiry is not None and expiry > now:
            return False
        self._seen[nonce] = now + max(ttl_s, 1)
        self._seen.move_to_end(nonce)
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)
        return True


class _ReplyError(str):
    """An error reply (`-ERR ...`) from Redis."""


_INCOMPLETE: Final = object()


def _parse_reply(buf: bytearray, pos: int) -> tuple[Any, int]:
    """One RESP2 reply at `pos`: (value, next position), or (_INCOMPLETE, pos)."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return _INCOMPLETE, pos
    kind = buf[pos]
    line = bytes(buf[pos + 1 : end])
    after = end + 2
    if kind == 0x3A:  # ':' integer
        return int(line), after
    if kind == 0x2B:  # '+' simple string
        return line.decode(), after
    if kind == 0x2D:  # '-' error
        return _ReplyError(line.decode("utf-8", "replace")), after
    if kind == 0x24:  # '$' bulk string
        size = int(line)
        if size < 0:
            return None, after
        if len(buf) < after + size + 2:
            return _INCOMPLETE, pos
        return bytes(buf[after : after + size]), after + size + 2
    if kind == 0x2A:  # '*' array
        count = int(line)
        if count < 0:
            return None, after
        items: list[Any] = []
        for _ in range(count):
            item, after = _parse_reply(buf, after)
            if item is _INCOMPLETE:
                return _INCOMPLETE, pos
            items.append(item)
        return items, after
    raise redis.exceptions.ConnectionError("unexpected reply from redis")


def _pack(*args: str | int | bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


class _Pipe(asyncio.Protocol):
    """One Redis connection; replies come back in order, so waiters are a FIFO."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._transport: CoalescedWrites | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._loop = asyncio.get_running_loop()  # once, not per call (it asks getpid())
        # The scripts of every request admitted in one loop iteration leave in one write.
        self._transport = CoalescedWrites(transport, self._loop)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self._buf += data
        pos = 0
        try:
            while self._waiters:
                value, after = _parse_reply(self._buf, pos)
                if value is _INCOMPLETE:
                    break
                pos = after
                waiter = self._waiters.popleft()
                if not waiter.done():  # a timed-out caller's reply is skipped, in order
                    waiter.set_result(value)
        except (ValueError, redis.exceptions.ConnectionError):
            self.close()
            return
        del self._buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(redis.exceptions.ConnectionError("redis connection lost"))

    def call(self, packed: bytes) -> asyncio.Future[Any]:
        if self.closed or self._transport is None or self._loop is None:
            raise redis.exceptions.ConnectionError("redis connection closed")
        waiter: asyncio.Future[Any] = self._loop.create_future()
        self._waiters.append(waiter)
        self._transport.write(packed)
        return waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self.connection_lost(None)


def tls_context(kwargs: Mapping[str, Any]) -> ssl.SSLContext:
    """The TLS context redis-py would use for a `rediss://` URL's connection kwargs."""
    context = ssl.create_default_context(
        cafile=kwargs.get("ssl_ca_certs"), cadata=kwargs.get("ssl_ca_data")
    )
    certfile = kwargs.get("ssl_certfile")
    if certfile:
        context.load_cert_chain(certfile, kwargs.get("ssl_keyfile"), kwargs.get("ssl_password"))
    reqs = kwargs.get("ssl_cert_reqs", "required")
    modes = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
    mode = modes.get(reqs, ssl.CERT_REQUIRED) if isinstance(reqs, str) else ssl.VerifyMode(reqs)
    context.check_hostname = bool(kwargs.get("ssl_check_hostname", True)) and (
        mode is not ssl.CERT_NONE
    )
    context.verify_mode = mode
    return context


class PipelinedScript:
    """EVALSHA of one Lua script over a single pipelined connection of its own.

    redis-py's asyncio client spends ~250 us of CPU per call (pool checkout, retry
    wrapper, timeouts, parsing); concurrent requests here share one connection and
    only pay for packing and parsing a five-integer reply. TCP or TLS (`rediss://`,
    the server certificate verified unless the URL says `ssl_cert_reqs=none`). Behind
    Sentinel each connection goes to the master Sentinel names at that moment (`resolve`),
    so a failover is followed at the next reconnect. For a unix socket or a cluster
    `for_client` returns None and callers keep redis-py. Any connection trouble raises
    `redis.exceptions.ConnectionError`, and the next call reconnects.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        connect_timeout_s: float = 0.5,
        script: str,
        tls: ssl.SSLContext | None = None,
        resolve: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        """`resolve()`: the (host, port) to connect to now, instead of host and port."""
        self._host, self._port, self._db = host, port, db
        self._resolve = resolve
        self._tls = tls
        self._username, self._password = username, password
        self._connect_timeout_s = connect_timeout_s
        self._script = script.encode()
        self._sha = hashlib.sha1(self._script, usedforsecurity=False).hexdigest()
        self._pipe: _Pipe | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def for_client(cls, client: aioredis.Redis, script: str) -> PipelinedScript | None:
        if cluster_of(client) is not None:
            return None
        pool = client.connection_pool
        kw = pool.connection_kwargs
        resolve = pool.get_master_address if isinstance(pool, SentinelConnectionPool) else None
        if pool.connection_class in (_SslConnection, SentinelManagedSSLConnection):
            tls: ssl.SSLContext | None = tls_context(kw)
        elif pool.connection_class is _TcpConnection or resolve is not None:
            tls = None
        else:
            return None
        return cls(
            resolve=resolve,
            tls=tls,
            host=str(kw.get("host", "localhost")),
            port=int(kw.get("port", 6379)),
            db=int(kw.get("db", 0) or 0),
            username=kw.get("username"),
            password=kw.get("password"),
            connect_timeout_s=float(kw.get("socket_connect_timeout") or 0.5),
            script=script,
        )

    async def _connected(self) -> _Pipe:
        pipe = self._pipe
        if pipe is not None and not pipe.closed:
            return pipe
        async with self._lock:
            if self._pipe is not None and not self._pipe.closed:
                return self._pipe
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    host, port = self._host, self._port
                    if self._resolve is not None:
                        host, port = await self._resolve()
                    _, pipe = await loop.create_connection(
                        _Pipe,
                        host,
                        port,
                        ssl=self._tls,
                        server_hostname=host if self._tls is not None else None,
                    )
                    setup = []
                    if self._password is not None:
                        auth = (
                            (self._username, self._password)
                            if self._username
                            else (self._password,)
                        )
                        setup.append(pipe.call(_pack("AUTH", *auth)))
                    if self._db:
                        setup.append(pipe.call(_pack("SELECT", self._db)))
                    for reply in await asyncio.gather(*setup):
                        if isinstance(reply, _ReplyError):
                            pipe.close()
                            raise redis.exceptions.ConnectionError("redis refused the session")
            except OSError as exc:
                raise redis.exceptions.ConnectionError(type(exc).__name__) from None
            self._pipe = pipe
            return pipe

    def send(self, keys: Sequence[str], args: Sequence[int | str]) -> asyncio.Future[Any] | None:
        """EVALSHA on the open connection without a coroutine: its raw reply's future
        (a `NOSCRIPT` or other error reply is the caller's to handle), or None when not
        connected (then `await self(...)`)."""
        pipe = self._pipe
        if pipe is None or pipe.closed:
            return None
        return pipe.call(_pack("EVALSHA", self._sha, len(keys), *keys, *args))

    async def __call__(
        self, *, keys: Sequence[str], args: Sequence[int | str], asking: bool = False
    ) -> Any:
        """`asking`: `ASKING` first, on this same connection (the answer to a Cluster ASK
        redirect: the node importing the slot serves the next command of this connection
        only)."""
        pipe = await self._connected()
        tail: tuple[str | int, ...] = (len(keys), *keys, *args)
        reply = await self._run(pipe, asking, _pack("EVALSHA", self._sha, *tail))
        if isinstance(reply, _ReplyError) and reply.startswith("NOSCRIPT"):
            reply = await self._run(pipe, asking, _pack("EVAL", self._script, *tail))
        if isinstance(reply, _ReplyError):
            raise redis.exceptions.ResponseError(reply)
        return reply

    @staticmethod
    async def _run(pipe: _Pipe, asking: bool, packed: bytes) -> Any:
        if not asking:
            return await pipe.call(packed)
        # Both written in this loop turn, nothing between them: the pair stays adjacent.
        _, reply = await asyncio.gather(pipe.call(_pack("ASKING")), pipe.call(packed))
        return reply

    def reset(self) -> None:
        """Drop the connection (e.g. after a timeout); the next call reconnects."""
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None

    async def aclose(self) -> None:
        self.reset()


@dataclass(frozen=True, slots=True)
class RiderCall:
    """One request's part of the rider: its key and its ARGV (see `admission_with`)."""

    key: str
    args: Sequence[int | str]


class Admission:
    """One admission check per request, shared by every replica through Redis.

    `rider`: Lua that rides in the same script and round trip (shared.budgets'
    reservation, see `admission_with`), for the checks given a `RiderCall`; without
    one, a check runs the plain script, as cheap as without a rider.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        service: str,
        failure_modes: Mapping[str, FailureMode] | None = None,
        block_after_strikes: int = 20,
        strike_window_s: float = 60,
        block_for_s: float = 300,
        deadline_s: float | None = None,
        pipelined: bool = False,
        rider: str | None = None,
    ) -> None:
        """`pipelined=True` sends `check` over one pipelined connection of its own
        (`PipelinedScript`, much cheaper per call; a second one for the rider's
        script); call `aclose()` when done."""
        self._redis = redis
        self._service = service
        self._modes = dict(failure_modes or {})
        self._block_after = block_after_strikes
        self._strike_window_ms = max(1, int(strike_window_s * 1000))
        self._block_ms = max(1, int(block_for_s * 1000))
        cluster = cluster_of(redis)
        grouped = SlotGroupedAdmission(cluster, _ADMIT_LUA) if cluster is not None else None
        self._admit: Any = grouped or redis.register_script(_ADMIT_LUA)
        self._pipelined = PipelinedScript.for_client(redis, _ADMIT_LUA) if pipelined else None
        self._ridden: Any = None
        self._ridden_pipelined: PipelinedScript | None = None
        if rider is not None and grouped is not None:
            # The rider's key is in a slot of its own: a step after the slot groups.
            self._ridden = functools.partial(grouped.ridden, rider)
        elif rider is not None:
            combined = admission_with(rider)
            self._ridden = redis.register_script(combined)
            if pipelined:
                self._ridden_pipelined = PipelinedScript.for_client(redis, combined)
        if pipelined and self._pipelined is None and cluster is None:
            log.warning(
                "pipelined admission not in use for this Redis connection (%s); "
                "checks go through redis-py",
                redis.connection_pool.connection_class.__name__,
                extra={"fields": {"service": service}},
            )
        self._strike = redis.register_script(_STRIKE_LUA)
        self._local = LocalGcra()
        self._local_nonces = _LocalNonces()
        self._degraded = False
        # Belt and braces over the socket timeouts: a check never outlives this.
        if deadline_s is None:
            pool = getattr(redis, "connection_pool", None)
            kwargs = pool.connection_kwargs if pool is not None else {}
            if cluster is not None:
                kwargs = cluster.get_connection_kwargs()
            socket_timeout = kwargs.get("socket_timeout") or 5.0
            deadline_s = 2 * float(socket_timeout) + 0.5
        self._deadline_s = deadline_s

    @property
    def degraded(self) -> bool:
        """True while the last Redis call failed."""
        return self._degraded

    def mode_for(self, layer: str) -> FailureMode:
        return self._modes.get(layer, FailureMode.closed)

    async def check(
        self,
        *,
        limits: Sequence[Limit],
        client_ip: str,
        nonce: str | None = None,
        nonce_ttl_s: int = 0,
        revoked_token_id: str | None = None,
        revoked_user: tuple[str, int] | None = None,
        rider: RiderCall | None = None,
    ) -> Decision:
        """`revoked_user` is (user hash, token iat): refused when revoked at or after iat.

        With `rider` (the Admission was built with one) its Lua runs in the same script,
        and the decision carries its answer (`Decision.rider`, `rider_refused`)."""
        keys = [
            block_key(client_ip),
            revoked_key(revoked_token_id) if revoked_token_id else "",
            nonce_key(nonce) if nonce else "",
            revoked_user_key(revoked_user[0]) if revoked_user else "",
            *(rate_key(item.layer, item.subject) for item in limits),
        ]
        args: list[int | str] = [
            max(1, nonce_ttl_s) * 1000 if nonce else 0,
            revoked_user[1] if revoked_user else 0,
        ]
        for item in limits:
            args += [max(1, round(item.period_s * _US)), item.limit]
        if rider is not None:
            if self._ridden is None:
                raise ValueError("this Admission was built without a rider")
            keys.append(rider.key)
            args += rider.args
            pipe, script = self._ridden_pipelined, self._ridden_pipelined or self._ridden
        else:
            pipe, script = self._pipelined, self._pipelined or self._admit
        try:
            with redis_unavailable():
                async with asyncio.timeout(self._deadline_s):
                    raw: Any = await script(keys=keys, args=args)
        except RedisUnavailableError as exc:
            if pipe is not None and exc.reply_code in (None, "READONLY"):
                # A stuck or broken connection, or a master demoted by a failover: not reused.
                pipe.reset()
            return replace(self._fallback(limits, nonce, nonce_ttl_s, exc), fallback=True)
        self._recovered()
        return self._decision(raw, limits, ridden=rider is not None)

    async def aclose(self) -> None:
        """Close the pipelined connections, if any (the redis client is the caller's)."""
        for pipe in (self._pipelined, self._ridden_pipelined):
            if pipe is not None:
                await pipe.aclose()
        if isinstance(self._admit, SlotGroupedAdmission):
            await self._admit.aclose()

    async def strike(self, client_ip: str, reason: Category) -> bool:
        """Count an auth failure or limit hit; True when this strike blocked `client_ip`."""
        try:
            with redis_unavailable():
                async with asyncio.timeout(self._deadline_s):
                    blocked = await self._strike(
                        keys=[strikes_key(client_ip), block_key(client_ip)],
                        args=[self._block_after, self._strike_window_ms, self._block_ms],
                    )
        except RedisUnavailableError as exc:
            BACKEND_ERRORS.labels(self._service).inc()
            log.warning("strike not recorded, redis unavailable (%s)", exc)
            return False
        if blocked:
            log.warning(
                "client blocked after repeated failures",
                extra={"fields": {"reason": reason, "block_for_s": self._block_ms / 1000}},
            )
            return True
        return False

    def _decision(self, raw: Any, limits: Sequence[Limit], *, ridden: bool = False) -> Decision:
        code, index, remaining, reset_us, retry_us = (int(v) for v in raw[:5])
        if code == _RIDER_REFUSED:
            # Refused by the rider: no layer was consumed (its owner counts the refusal).
            return Decision(allowed=False, rider=tuple(raw[5:]), rider_refused=True)
        if code in _CHECK_LAYERS:
            DECISIONS.labels(self._service, _CHECK_LAYERS[code], "blocked").inc()
            return Decision(
                allowed=False,
                refusal=_REFUSALS[code],
                reset_after_s=reset_us / _US,
                retry_after_s=retry_us / _US,
            )
        item = limits[index - 1] if index else None
        if code == _LIMITED:
            assert item is not None
            DECISIONS.labels(self._service, item.layer, "limited").inc()
        else:
            for each in limits:
                DECISIONS.labels(self._service, each.layer, "allowed").inc()
        return Decision(
            allowed=code == _OK,
            refusal=_REFUSALS[code],
            layer=item.layer if item else None,
            limit=item.limit if item else None,
            remaining=remaining if item else None,
            reset_after_s=reset_us / _US,
            retry_after_s=retry_us / _US,
            window_s=item.period_s if item else None,
            rider=tuple(raw[5:]) if ridden and code == _OK else None,
        )

    def _fallback(
        self,
        limits: Sequence[Limit],
        nonce: str | None,
        nonce_ttl_s: int,
        exc: BaseException,
    ) -> Decision:
        BACKEND_ERRORS.labels(self._service).inc()
        modes = {item.layer: self.mode_for(item.layer) for item in limits}
        if not self._degraded:
            self._degraded = True
            log.error(
                "rate limiting backend unreachable (%s); layers fall back to %s",
                exc,
                ", ".join(f"{layer}={mode}" for layer, mode in modes.items()) or "closed",
                extra={"fields": {"service": self._service}},
            )
        closed = [item for item in limits if modes[item.layer] is FailureMode.closed]
        if closed or not limits:
            for item in closed or limits:
                DECISIONS.labels(self._service, item.layer, "unavailable").inc()
            return Decision(
                allowed=False,
                refusal=Refusal.SECURITY_UNAVAILABLE,
                layer=closed[0].layer if closed else None,
                retry_after_s=1.0,
            )
        if nonce and not self._local_nonces.first_use(nonce, nonce_ttl_s):
            DECISIONS.labels(self._service, "nonce", "blocked").inc()
            return Decision(allowed=False, refusal=Refusal.REPLAY_DETECTED)
        local = [item for item in limits if modes[item.layer] is FailureMode.local]
        decision = self._local.check(local) if local else Decision(allowed=True)
        if not decision.allowed:
            DECISIONS.labels(self._service, decision.layer or "local", "limited").inc()
            return decision
        for item in limits:
            DECISIONS.labels(self._service, item.layer, "allowed").inc()
        return decision

    def _recovered(self) -> None:
        if self._degraded:
            self._degraded = False
            log.warning(
                "rate limiting backend reachable again",
                extra={"fields": {"service": self._service}},
            )
