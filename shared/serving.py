"""How an HTTP edge is served: which ASGI server, and how many worker processes.

- `KEYVEIL_HTTP_SERVER=uvicorn` (the default) runs `shared.httpprotocol`'s bounded
  httptools protocol: URL, header-count, header-byte and slow-head bounds, the write
  timeout. `granian` runs granian's Rust HTTP/1.1 server in this process; of those
  bounds it enforces the head timeout and a buffer cap (`HTTP_HEADER_TIMEOUT_S`,
  `HTTP_MAX_HEADER_BYTES`), not the per-field counts nor the JSON refusals.
- `KEYVEIL_WORKERS=N` (N > 1) turns this process into a supervisor of N worker
  processes, each the same service with one worker, all bound to the same port with
  SO_REUSEPORT so the kernel spreads connections across them. A worker that exits
  on its own stops the others and the supervisor exits with its status: the pod is
  restarted whole instead of serving at part capacity unnoticed.
- Metrics with several workers: prometheus multiprocess mode. Every worker gets the
  same fresh `PROMETHEUS_MULTIPROC_DIR` (the one set, else a temporary directory),
  so `/metrics` on any worker answers for all of them: counters and histograms are
  summed, gauges follow their `multiprocess_mode`; a dead worker's files are marked
  dead. One scrape target per pod, as with one worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from shared.settings import EdgeSettings, settings_or_exit
from shared.telemetry import configure_logging, configure_tracing

__all__ = ["WORKER_ENV", "HttpServer", "serve_edge", "supervise"]

log = logging.getLogger(__name__)

HttpServer = Literal["uvicorn", "granian"]
# Set in each worker's environment by the supervisor: "serve, do not supervise".
WORKER_ENV = "KEYVEIL_WORKER_INDEX"
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

S = TypeVar("S", bound=EdgeSettings)


def serve_edge(
    service: str,
    model: type[S],
    create_app: Callable[[S], Any],
    *,
    module: str,
    server: Callable[[S], HttpServer],
    workers: Callable[[S], int],
) -> None:
    """A service's whole `main()`: settings (or exit 2), then serve or supervise.

    `module` is what `python -m` runs for each worker; `server` and `workers` read
    the service's own settings fields (KEYVEIL_HTTP_SERVER, KEYVEIL_WORKERS). Nothing
    that defines a metric may be imported before the choice (so `create_app` imports
    the app lazily): in multiprocess mode prometheus_client opens its files at import,
    and the supervisor must not have any.
    """
    settings = settings_or_exit(model)
    count = workers(settings)
    if count > 1 and WORKER_ENV not in os.environ:
        if settings.port == 0:  # each worker would pick a port of its own
            print("keyveil: KEYVEIL_WORKERS > 1 needs a fixed KEYVEIL_PORT", file=sys.stderr)
            raise SystemExit(2)
        configure_logging(service, level=settings.log_level, fmt=settings.log_format)
        sys.exit(supervise(module, count))
    from shared.httpedge import record_build_info

    record_build_info(service)
    configure_logging(service, level=settings.log_level, fmt=settings.log_format)
    configure_tracing(service)
    app = create_app(settings)
    shared_port = WORKER_ENV in os.environ
    if server(settings) == "granian":
        run_granian(app, settings, reuse_port=shared_port)
    else:
        run_uvicorn(app, settings, reuse_port=shared_port)


def run_uvicorn(app: Any, settings: EdgeSettings, *, reuse_port: bool) -> None:
    """uvicorn with the bounded protocol; on a SO_REUSEPORT socket of its own when asked."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    from shared.httpedge import uvicorn_config

    server = uvicorn.Server(uvicorn_config(app, settings))
    sockets = [_reuse_port_socket(settings.host, settings.port)] if reuse_port else None
    server.run(sockets=sockets)
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def run_granian(app: Any, settings: EdgeSettings, *, reuse_port: bool) -> None:
    """granian's embedded server in this process: lifespan, SIGTERM drains like uvicorn.

    granian binds with SO_REUSEPORT on Linux itself, so `reuse_port` needs nothing more.
    """
    del reuse_port
    import uvloop
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings
    from granian.server.embed import Server

    server = Server(
        app,
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        http=HTTPModes.http1,
        http1_settings=HTTP1Settings(
            header_read_timeout=int(settings.header_timeout_s * 1000),
            max_buffer_size=settings.max_header_bytes + settings.max_url_bytes + 4096,
        ),
        backlog=2048,
        log_enabled=False,
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, server.stop)
        await server.serve()

    uvloop.run(main())


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def supervise(module: str, count: int) -> int:
    """Run `python -m module` `count` times on one port until SIGTERM; the exit status."""
    given = os.environ.get(_MULTIPROC_ENV)
    metrics_dir = Path(given) if given else Path(tempfile.mkdtemp(prefix="keyveil-metrics-"))
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in metrics_dir.glob("*.db"):  # a previous run's values must not be summed in
        stale.unlink()
    children: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for index in range(count):
        env = {**os.environ, WORKER_ENV: str(index), _MULTIPROC_ENV: str(metrics_dir)}
        child = subprocess.Popen([sys.executable, "-m", module], env=env)  # noqa: S603
        children[child.pid] = child
    log.info("supervising %d workers of %s", count, module)
    status = 0
    try:
        while children:
            pid, raw = os.wait()
            gone = children.pop(pid, None)
            if gone is None:
                continue
            code = os.waitstatus_to_exitcode(raw)
            gone.returncode = code
            _mark_dead(pid, metrics_dir)
            if not stopping:
                log.error("worker %d exited (%d): stopping the others", pid, code)
                status = code or 1
                stop()
            elif code not in (0, -signal.SIGTERM) and not status:
                status = code if code > 0 else 1
    finally:
        if not given:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return status


def _mark_dead(pid: int, metrics_dir: Path) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]
