"""Which Redis keyveil talks to, and the one factory that builds a client for it.

Three topologies, chosen by configuration (docs/redis.md has the design):

    standalone   REDIS_URL                                  one server (the default)
    sentinel     REDIS_SENTINELS + REDIS_SENTINEL_MASTER    a master found by Sentinel,
                                                            followed across failovers
    cluster      REDIS_CLUSTER=true, seeds in REDIS_URL     Redis/Valkey Cluster

Every client gets the same socket and connect timeouts and one quick retry, so nothing
hangs and the limiter's failure mode applies within REDIS_TIMEOUT_S. `rediss://` turns
TLS on in every topology (for the Sentinel servers too).

A cluster client is a `redis.asyncio.cluster.RedisCluster`: not a subclass of
`redis.asyncio.Redis`, but with the same command methods. `connect` returns it typed as
`Redis` so the services need no second code path; the few places that need the
connection pool (shared.ratelimit's pipelined script) ask `cluster_of` first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, cast
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.connection import parse_url as _parse_url

__all__ = [
    "RedisSettings",
    "RedisTopology",
    "Topology",
    "TopologyError",
    "cluster_of",
    "connect",
    "parse_hosts",
    "seed_nodes",
]


def parse_url(url: str) -> dict[str, Any]:
    """redis-py's URL parser (connection kwargs), typed."""
    kwargs: dict[str, Any] = _parse_url(url)  # type: ignore[no-untyped-call]
    return kwargs


class TopologyError(ValueError):
    """A topology the settings cannot describe; `variable` names the one to fix."""

    def __init__(self, variable: str, rule: str) -> None:
        self.variable = variable
        super().__init__(rule)


class Topology(StrEnum):
    standalone = "standalone"
    sentinel = "sentinel"
    cluster = "cluster"


def parse_hosts(value: str, *, default_port: int) -> list[tuple[str, int]]:
    """`host[:port],host[:port]` (IPv6 in brackets) as (host, port) pairs; ValueError if bad."""
    hosts: list[tuple[str, int]] = []
    for raw in value.split(","):
        item = raw.strip()
        if not item:
            continue
        parts = urlsplit(f"//{item}")
        try:
            port = parts.port or default_port
        except ValueError:
            raise ValueError(f"bad port in {item!r}") from None
        if not parts.hostname or parts.path or parts.username:
            raise ValueError(f"{item!r} is not host[:port]")
        hosts.append((parts.hostname, port))
    if not hosts:
        raise ValueError("no host given")
    return hosts


def seed_nodes(url: str) -> tuple[str, list[tuple[str, int]]]:
    """A cluster URL with comma-separated seeds -> (URL of the first seed, every seed)."""
    parts = urlsplit(url)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    seeds = parse_hosts(hostlist, default_port=6379)
    first = f"{userinfo}@{hostlist.split(',')[0]}" if userinfo else hostlist.split(",")[0]
    return urlunsplit(parts._replace(netloc=first)), seeds


@dataclass(frozen=True)
class RedisTopology:
    """Where Redis is: the URL (credentials, TLS, database) and how to find the master."""

    url: str
    timeout_s: float = 0.5
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_master: str | None = None
    cluster: bool = False

    def __post_init__(self) -> None:
        if self.cluster and self.sentinels:
            raise TopologyError(
                "REDIS_CLUSTER", "REDIS_CLUSTER and REDIS_SENTINELS exclude each other"
            )
        if self.sentinels and not self.sentinel_master:
            raise TopologyError("REDIS_SENTINEL_MASTER", "required with REDIS_SENTINELS")
        scheme = urlsplit(self.url).scheme
        if self.kind is not Topology.standalone and scheme not in ("redis", "rediss"):
            raise TopologyError("REDIS_URL", f"{self.kind} needs a redis:// or rediss:// URL")
        if self.cluster:
            try:
                first, _ = seed_nodes(self.url)
            except ValueError as exc:
                raise TopologyError("REDIS_URL", f"cluster seeds: {exc}") from None
            if int(parse_url(first).get("db") or 0) != 0:
                raise TopologyError("REDIS_URL", "a cluster has database 0 only")

    @property
    def kind(self) -> Topology:
        if self.cluster:
            return Topology.cluster
        return Topology.sentinel if self.sentinels else Topology.standalone

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str], *, url: str, timeout_s: float = 3.0
    ) -> RedisTopology:
        """From REDIS_SENTINELS, REDIS_SENTINEL_MASTER and REDIS_CLUSTER (operator commands)."""
        sentinels = environ.get("REDIS_SENTINELS", "")
        return cls(
            url=url,
            timeout_s=timeout_s,
            sentinels=tuple(parse_hosts(sentinels, default_port=26379)) if sentinels else (),
            sentinel_master=environ.get("REDIS_SENTINEL_MASTER") or None,
            cluster=environ.get("REDIS_CLUSTER", "").strip().lower() in ("1", "true", "yes"),
        )

    @classmethod
    def from_settings(cls, settings: RedisSettings, *, url: str | None = None) -> RedisTopology:
        """From EdgeSettings (REDIS_*); `url` replaces REDIS_URL (the response cache's)."""
        return cls(
            url=url or settings.redis_url,
            timeout_s=settings.redis_timeout_s,
            sentinels=tuple(settings.redis_sentinel_hosts),
            sentinel_master=settings.redis_sentinel_master,
            cluster=settings.redis_cluster,
        )


class RedisSettings(Protocol):
    """The REDIS_* fields of shared.settings.EdgeSettings (which imports this module)."""

    redis_url: str
    redis_timeout_s: float
    redis_sentinel_master: str | None
    redis_cluster: bool

    @property
    def redis_sentinel_hosts(self) -> list[tuple[str, int]]: ...


def _common(timeout_s: float) -> dict[str, Any]:
    # The single retry replaces a pooled connection that died with a restarted server;
    # anything more would multiply the worst-case latency.
    return {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 1),
        "health_check_interval": 0,
    }


class _SentinelMaster(aioredis.Redis):
    """The master's client; closing it also closes the connections to the sentinels."""

    finder: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.finder is not None:
            await self.finder.aclose()


_TLS_KEYS = ("ssl_ca_certs", "ssl_ca_data", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")


def connect(topology: RedisTopology) -> aioredis.Redis:
    """A client for `topology` that cannot hang (see the module docstring)."""
    common = _common(topology.timeout_s)
    if topology.kind is Topology.standalone:
        client: aioredis.Redis = aioredis.Redis.from_url(topology.url, **common)
        return client
    if topology.kind is Topology.sentinel:
        kwargs = parse_url(topology.url)
        kwargs.pop("host", None)
        kwargs.pop("port", None)
        tls = kwargs.pop("connection_class", None) is not None  # SSLConnection for rediss://
        tls_kwargs = {k: v for k, v in kwargs.items() if k in _TLS_KEYS}
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(topology.sentinels),
            sentinel_kwargs={**common, **({"ssl": True, **tls_kwargs} if tls else {})},
            **common,
        )
        master = cast(
            _SentinelMaster,
            sentinel.master_for(
                topology.sentinel_master or "", redis_class=_SentinelMaster, ssl=tls, **kwargs
            ),
        )
        master.finder = sentinel
        return master
    first, seeds = seed_nodes(topology.url)
    kwargs = parse_url(first)
    kwargs.pop("db", None)
    tls = kwargs.pop("connection_class", None) is not None
    host, port = kwargs.pop("host"), kwargs.pop("port")
    cluster = RedisCluster(
        host=host,
        port=port,
        startup_nodes=[ClusterNode(h, p) for h, p in seeds],
        ssl=tls,
        # Per node; redis-py refuses (MaxConnectionsError) rather than waits past it.
        max_connections=1024,
        **common,
        **kwargs,
    )
    return cast(aioredis.Redis, cluster)


def cluster_of(client: Any) -> RedisCluster | None:
    """`client` as a RedisCluster, or None when it talks to one server."""
    return client if isinstance(client, RedisCluster) else None
