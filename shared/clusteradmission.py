"""The admission script on Redis/Valkey Cluster: one call per slot group, in parallel.

A Cluster script may only touch keys of one slot. Every admission key carries its
subject as a hash tag (shared.ratelimit), so one check's keys fall into at most three
slots: the client IP's (block, per-ip layer), the token's (revocation, nonce, per-token
layer) and the user's (user revocation, per-user layer). Each group runs the same
`_ADMIT_LUA`, atomically for its own keys: its checks, then all its layers or none.

    all groups admit        -> admitted; every layer consumed exactly once
    some group refuses      -> refused; the groups that admitted are refunded
                               (`_REFUND_LUA`: each TAT put back, the nonce forgotten)
    some group unreachable  -> the others refunded, the outage raised (fail closed)

Limits stay exact because a request is admitted only when every group admitted it, and
each group's consumption is atomic. The cost of two steps is over-refusal, never
over-admission: between a group's admit and its refund (one round trip) a neighbour
sees one unit taken; a refund is skipped when another request moved that TAT in
between (putting it back could erase the other's unit), and then the refused request
keeps one unit until it drains (one emission interval). A proxy killed between the two
steps leaves the same. docs/redis.md has the table.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final

import redis.exceptions
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.crc import key_slot

__all__ = ["SlotGroupedAdmission", "hash_tag"]

log = logging.getLogger(__name__)

# KEYS: the admitted layer keys, then the nonce key when ARGV[1] == '1'.
# ARGV: nonce flag, then (stored TAT, period_us, limit) per layer.
_REFUND_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = (#ARGV - 1) / 3
for i = 1, n do
  local stored = ARGV[3 * i - 1]
  if redis.call('GET', KEYS[i]) == stored then
    local back = tonumber(stored) - tonumber(ARGV[3 * i]) / tonumber(ARGV[3 * i + 1])
    local ttl_ms = math.ceil((back - now) / 1000)
    if ttl_ms > 0 then
      redis.call('SET', KEYS[i], string.format('%.17g', back), 'PX', ttl_ms)
    else
      redis.call('DEL', KEYS[i])
    end
  end
end
if ARGV[1] == '1' then redis.call('DEL', KEYS[n + 1]) end
return 1
"""

_CHECKS: Final = 4  # block, revoked token, nonce, revoked user (the script's first KEYS)
_NONCE: Final = 2
# Which refusal wins when several groups refuse: the order the single script checks in.
_PRECEDENCE: Final = {4: 0, 3: 1, 2: 2, 1: 3}


def hash_tag(key: str) -> str:
    """What Cluster hashes for `key`: the first non-empty {...}, else the whole key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


@lru_cache(maxsize=65_536)
def _tag_slot(tag: str) -> tuple[int, str]:
    """The slot of a hash tag, and a key of that slot that is never written (it stands
    for a check a slot group lacks). Cached: the subjects repeat, the nonces do not."""
    slot = key_slot(tag.encode())
    placeholder = f"kv:unused:{{{tag}}}"
    if key_slot(placeholder.encode()) != slot:
        raise ValueError("a key whose hash tag cannot be reproduced")
    return slot, placeholder


@dataclass
class _Group:
    slot: int
    placeholder: str
    checks: dict[int, str] = field(default_factory=dict)  # script position -> key
    layers: list[int] = field(default_factory=list)  # indices into the request's layers


class _SlotRouter:
    """Scripts sent to the master of a slot, one pipelined connection per master.

    redis-py's cluster client checks a connection out of a per-node pool per call (and
    refuses when the pool is full); here concurrent checks share one pipelined
    connection per master (shared.ratelimit.PipelinedScript). The slot map is redis-py's
    (`nodes_manager`), reloaded after a connection failure (at most every `_REFRESH_S`),
    which is how a failover is followed. The redirects of a slot being migrated are
    followed as redis-py's cluster client follows them:

        MOVED      the slot map takes the node named, the script is sent there (once)
        ASK        ASKING and the script on the named node's connection (once); the
                   slot map is left alone (the slot has not moved yet)
        TRYAGAIN   some of the script's keys moved, others not (a multi-key script is
                   refused on both nodes then): sent again after `_PAUSE_S`, for up to
                   the socket timeout, then raised (an outage)

    A redirect after the one followed is treated as TRYAGAIN (the map reloaded first).
    """

    _REFRESH_S: Final = 0.2
    _PAUSE_S: Final = 0.01

    def __init__(self, cluster: RedisCluster, scripts: dict[str, str]) -> None:
        self._cluster = cluster
        self._scripts = scripts
        self._pipes: dict[tuple[str, str], Any] = {}
        self._started = False
        self._stale = False
        self._refreshed_at = 0.0
        self._lock = asyncio.Lock()
        self._patience_s = float(cluster.get_connection_kwargs().get("socket_timeout") or 0.5)

    async def call(self, name: str, slot: int, keys: Sequence[str], args: Sequence[Any]) -> Any:
        give_up = time.monotonic() + self._patience_s
        while True:
            await self._fresh()
            node = self._cluster.nodes_manager.get_node_from_slot(slot)
            asking = False
            for hop in (0, 1):
                pipe = self._pipe(name, node)
                try:
                    return await pipe(keys=keys, args=args, asking=asking)
                except redis.exceptions.ResponseError as exc:
                    code, _, detail = str(exc).partition(" ")
                    if code in ("MOVED", "ASK") and hop == 0:
                        redirect = redis.exceptions.AskError(detail)  # "slot host:port"
                        if code == "MOVED":
                            await self._cluster.nodes_manager.move_slot(redirect)
                        node = self._node_at(redirect.host, redirect.port)
                        asking = code == "ASK"
                        continue
                    if code in ("MOVED", "ASK", "TRYAGAIN") and time.monotonic() < give_up:
                        # a second redirect: the slot moved on again, the map is behind
                        self._stale = self._stale or code != "TRYAGAIN"
                        break
                    if code in ("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN", "READONLY"):
                        self._stale = True
                    raise
                except redis.exceptions.ConnectionError:
                    pipe.reset()
                    self._stale = True
                    raise
            await asyncio.sleep(self._PAUSE_S)

    def _node_at(self, host: str, port: int) -> ClusterNode:
        """The node a redirect names (a new one gets the cluster's connection settings)."""
        node = self._cluster.get_node(host=host, port=port)
        if node is None:
            node = ClusterNode(host, port, **self._cluster.nodes_manager.connection_kwargs)
        return node

    def add(self, name: str, script: str) -> None:
        """Another script this router may send (a rider's)."""
        self._scripts.setdefault(name, script)

    def send(
        self, name: str, slot: int, keys: Sequence[str], args: Sequence[Any]
    ) -> tuple[Any, Any]:
        """(awaitable, pipe): the raw reply's future on an open connection with a fresh
        slot map (pipe set: `settle` the reply), else the full `call` (pipe None)."""
        if self._started and not self._stale:
            node = self._cluster.nodes_manager.slots_cache.get(slot)
            if node:
                pipe = self._pipe(name, node[0])
                future = pipe.send(keys, args)
                if future is not None:
                    return future, pipe
        return self.call(name, slot, keys, args), None

    async def settle(
        self,
        outcome: Any,
        pipe: Any,
        name: str,
        slot: int,
        keys: Sequence[str],
        args: Sequence[Any],
    ) -> Any:
        """A `send` outcome as `call` would have returned it (or raised it)."""
        from shared.ratelimit import _ReplyError

        if pipe is None:
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        if isinstance(outcome, redis.exceptions.ConnectionError):
            pipe.reset()
            self._stale = True
            raise outcome
        if isinstance(outcome, BaseException):
            raise outcome
        if isinstance(outcome, _ReplyError):
            if outcome.startswith(("NOSCRIPT", "MOVED", "ASK", "TRYAGAIN")):
                # the script did not run: a new master without it, or a slot that moves
                return await self.call(name, slot, keys, args)
            if outcome.split(" ", 1)[0] in ("CLUSTERDOWN", "READONLY"):
                self._stale = True
            raise redis.exceptions.ResponseError(outcome)
        return outcome

    async def _fresh(self) -> None:
        if self._started and not self._stale:
            return
        async with self._lock:
            if not self._started:
                await self._cluster.initialize()
                self._started = True
                self._refreshed_at = time.monotonic()
            elif self._stale and time.monotonic() - self._refreshed_at >= self._REFRESH_S:
                self._refreshed_at = time.monotonic()
                await self._cluster.nodes_manager.initialize()
                self._stale = False

    def _pipe(self, name: str, node: ClusterNode) -> Any:
        pipe = self._pipes.get((name, node.name))
        if pipe is None:
            from shared.ratelimit import PipelinedScript, tls_context  # it imports this module

            kw = node.connection_kwargs
            pipe = PipelinedScript(
                host=node.host,
                port=int(node.port),
                username=kw.get("username"),
                password=kw.get("password"),
                connect_timeout_s=float(kw.get("socket_connect_timeout") or 0.5),
                script=self._scripts[name],
                # the node's class, not its kwargs (which lack it): rediss:// means TLS here too
                tls=tls_context(kw) if issubclass(node.connection_class, SSLConnection) else None,
            )
            self._pipes[(name, node.name)] = pipe
        return pipe

    async def aclose(self) -> None:
        for pipe in self._pipes.values():
            await pipe.aclose()
        self._pipes.clear()


class SlotGroupedAdmission:
    """Callable like a redis-py Script: `await admit(keys=..., args=...)`, cluster-safe."""

    def __init__(self, cluster: RedisCluster, script: str) -> None:
        self._router = _SlotRouter(cluster, {"admit": script, "refund": _REFUND_LUA})

    async def aclose(self) -> None:
        await self._router.aclose()

    async def __call__(self, *, keys: Sequence[str], args: Sequence[int | str]) -> list[Any]:
        reply, _ = await self._admit(keys, args)
        return reply

    async def ridden(
        self, rider: str, *, keys: Sequence[str], args: Sequence[int | str]
    ) -> list[Any]:
        """The admission with a rider (shared.ratelimit.admission_with's KEYS and ARGV:
        the rider's one key last, its ARGV after the layers'). On a cluster the rider runs
        in its own slot once every group admitted (a third step); when it refuses (code 5,
        its data after) the groups are refunded, so nothing of the admission is consumed.
        """
        layers = len(keys) - _CHECKS - 1
        cut = 2 + 2 * layers
        reply, admitted = await self._admit(keys[:-1], args[:cut])
        if int(reply[0]) != 0:
            return reply
        name = f"rider:{hashlib.sha1(rider.encode(), usedforsecurity=False).hexdigest()}"
        self._router.add(
            name, f"local function rider(KEYS, ARGV)\n{rider}\nend\nreturn rider(KEYS, ARGV)\n"
        )
        slot, _ = _tag_slot(hash_tag(keys[-1]))
        try:
            ridden = await self._router.call(name, slot, [keys[-1]], args[cut:])
        except Exception:
            await self._refund_all(admitted, keys[_CHECKS:-1], keys, args[2:cut])
            raise
        if int(ridden[0]) != 0:
            await self._refund_all(admitted, keys[_CHECKS:-1], keys, args[2:cut])
            return [5, 0, 0, 0, 0, *ridden[1:]]
        return [*reply[:5], *ridden[1:]]

    async def _admit(
        self, keys: Sequence[str], args: Sequence[int | str]
    ) -> tuple[list[Any], list[tuple[_Group, Any]]]:
        """The combined reply, and the groups that consumed (to refund on a later refusal)."""
        groups = self._groups(keys)
        layer_keys = keys[_CHECKS:]
        pairs = args[2:]
        sent = []
        for group in groups:
            group_keys = [group.checks.get(i) or group.placeholder for i in range(_CHECKS)]
            group_keys += [layer_keys[j] for j in group.layers]
            group_args = [args[0] if _NONCE in group.checks else 0, args[1]]
            for j in group.layers:
                group_args += [pairs[2 * j], pairs[2 * j + 1]]
            awaitable, pipe = self._router.send("admit", group.slot, group_keys, group_args)
            sent.append((awaitable, pipe, group, group_keys, group_args))
        outcomes = await asyncio.gather(*(s[0] for s in sent), return_exceptions=True)
        results: list[Any] = []
        for outcome, (_, pipe, group, group_keys, group_args) in zip(outcomes, sent, strict=True):
            try:
                results.append(
                    await self._router.settle(
                        outcome, pipe, "admit", group.slot, group_keys, group_args
                    )
                )
            except Exception as exc:  # an outage, or a bug: raised after the refunds
                results.append(exc)
        admitted = [
            (g, r) for g, r in zip(groups, results, strict=True) if not isinstance(r, BaseException)
        ]
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        refused = [(g, r) for g, r in admitted if int(r[0]) != 0]
        if failure is not None or refused:
            await self._refund_all(
                [(g, r) for g, r in admitted if int(r[0]) == 0], layer_keys, keys, pairs
            )
            if failure is not None:
                raise failure
            group, reply = min(refused, key=lambda gr: self._rank(gr[0], gr[1]))
            code, index = int(reply[0]), int(reply[1])
            return [code, group.layers[index - 1] + 1 if index else 0, *reply[2:5]], []
        # The tightest layer names the headers; on a tie the first, as the single script.
        candidates = [
            (int(reply[2]), group.layers[int(reply[1]) - 1] + 1, reply[3])
            for group, reply in admitted
            if int(reply[1])
        ]
        if not candidates:
            return [0, 0, 0, 0, 0], admitted
        remaining, index, reset = min(candidates, key=lambda c: (c[0], c[1]))
        return [0, index, remaining, reset, 0], admitted

    @staticmethod
    def _groups(keys: Sequence[str]) -> list[_Group]:
        by_slot: dict[int, _Group] = {}
        for position, key in enumerate(keys):
            if not key:
                continue
            slot, placeholder = _tag_slot(hash_tag(key))
            group = by_slot.get(slot)
            if group is None:
                group = by_slot[slot] = _Group(slot, placeholder)
            if position < _CHECKS:
                group.checks[position] = key
            else:
                group.layers.append(position - _CHECKS)
        return list(by_slot.values())

    @staticmethod
    def _rank(group: _Group, reply: Sequence[Any]) -> tuple[int, int]:
        code, index = int(reply[0]), int(reply[1])
        return _PRECEDENCE.get(code, 9), group.layers[index - 1] if index else -1

    async def _refund_all(
        self,
        admitted: list[tuple[_Group, Any]],
        layer_keys: Sequence[str],
        keys: Sequence[str],
        pairs: Sequence[int | str],
    ) -> None:
        calls = []
        for group, reply in admitted:
            nonce = _NONCE in group.checks
            if not group.layers and not nonce:
                continue  # it only read
            refund_keys = [layer_keys[j] for j in group.layers]
            refund_args: list[Any] = ["1" if nonce else "0"]
            for n, j in enumerate(group.layers):
                refund_args += [reply[5 + n], pairs[2 * j], pairs[2 * j + 1]]
            if nonce:
                refund_keys.append(keys[_NONCE])
            calls.append(self._router.call("refund", group.slot, refund_keys, refund_args))
        for outcome in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(outcome, BaseException):
                # Over-refusal only: the units stay taken until they drain.
                log.warning("admission refund not applied (%s)", type(outcome).__name__)
