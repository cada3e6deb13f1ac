"""`keyveil up`: the whole system on one machine, in the foreground, with real servers.

It starts nats-server (JetStream, per-service users from deploy/nats/auth.conf) and a
Redis-compatible server unless NATS_URL / REDIS_URL are given, the four services as
separate processes (plus proxy replicas and the fake upstream when asked), restarts
any process that dies, and writes `stack.json` (absolute paths) so tests and operator
commands find everything. Each service receives only the secrets it needs.

It cannot lie about its state: its ports are checked before anything starts; a service
is ready only when *its own* process answers (the pid in `/healthz`); a service that
refuses its configuration (exit code 2) is not restarted but ends the stack with its
error line; SIGINT, SIGTERM and SIGHUP (a closed terminal) stop every child, and the
children die with the supervisor even when it is killed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from keyveil.commands.audit import STATE_CHECKPOINTS, STATE_VERIFY_KEYS
from keyveil.servers import (
    ServerProcess,
    bootstrap_nats,
    die_with_parent,
    free_port,
    minimal_environ,
    nats_password,
    start_nats,
    start_redis,
    wait_for_port,
)
from services.auditor.ledgerkeys import LedgerSigner
from shared.settings import Environment, parse_environment

__all__ = ["StackOptions", "run_stack"]

log = logging.getLogger("keyveil.up")

REPO_ROOT = Path(__file__).resolve().parent.parent
NATS_AUTH_CONF = REPO_ROOT / "deploy" / "nats" / "auth.conf"
NATS_USERS = ("token", "proxy", "keymanager", "auditor", "operator", "observer", "bootstrap")
# Variables only some services may see; everything else in the environment passes through.
_PRIVATE_VARIABLES = (
    "OPENAI_API_KEY",
    "KEY_ENCRYPTION_SECRET",
    "KEY_ENCRYPTION_SECRET_PREVIOUS",
    "PROXY_SIGNING_KEY",
    "PROXY_SIGNING_KEY_PREVIOUS",
    "LEDGER_SIGNING_KEY",
    "KEYVEIL_PRINCIPAL_KEY",
    "KEYVEIL_ASSERTION_KEY",
    "NATS_USER",
    "NATS_PASSWORD",
    "KEYVEIL_PORT",
)
_RESTART_BACKOFF_MAX_S = 10.0
CONFIG_EXIT_CODE = 2  # shared.httpedge.settings_or_exit: the configuration was refused


class StackError(Exception):
    """`keyveil up` cannot start or keep running; the message says why and what to do."""


def say(line: str) -> None:
    """Print to the console, which may be gone (a closed terminal): never fail on it."""
    with contextlib.suppress(OSError, ValueError):
        print(line, flush=True)


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def last_error_line(path: Path) -> str:
    """The last non-empty line of a child's log (its refusal, for a configuration error)."""
    try:
        lines = path.read_bytes()[-8192:].decode("utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


@dataclass
class StackOptions:
    state_dir: Path
    demo: bool = False
    fake_upstream: bool = False
    proxy_replicas: int = 1
    base_port: int = 8080
    ready_timeout_s: float = 90.0


@dataclass
class Managed:
    """A child process `keyveil up` keeps alive."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = 0.0
    server: ServerProcess | None = None  # set for NATS / Redis, restarted via their argv
    fatal: str | None = None  # why it must not be restarted

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(  # noqa: S603 - argv built here, no shell
                self.argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                start_new_session=True,  # Ctrl-C reaches us; we stop children in order
                preexec_fn=die_with_parent,
            )
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if not self.alive():
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


@dataclass
class Stack:
    options: StackOptions
    children: list[Managed] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    stopping: bool = False
    ready: bool = False
    notes: list[str] = field(default_factory=list)  # said again at the end of start-up
    failed: str | None = None

    # --- secrets ---------------------------------------------------------------------

    def _state_file(self, name: str, make: Mapping[str, str]) -> tuple[dict[str, str], bool]:
        """A 0600 JSON file of generated secrets, created on first use; True when created."""
        path = self.options.state_dir / name
        if path.exists():
            data: dict[str, str] = json.loads(path.read_text())
            if set(make) <= set(data):
                return data, False
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(dict(make), out)
        os.chmod(path, 0o600)
        return dict(make), True

    def development_secrets(self, production: bool) -> dict[str, str]:
        """KEY_ENCRYPTION_SECRET / PROXY_SIGNING_KEY from the environment, else generated."""
        wanted = ("KEY_ENCRYPTION_SECRET", "PROXY_SIGNING_KEY")
        given = {name: os.environ[name] for name in wanted if os.environ.get(name)}
        missing = [name for name in wanted if name not in given]
        if missing and production:
            raise StackError(f"{', '.join(missing)} must be set in production")
        if missing:
            generated, created = self._state_file(
                "dev-secrets.json", {name: secrets.token_urlsafe(32) for name in wanted}
            )
            given.update({name: generated[name] for name in missing})
            where = self.options.state_dir / "dev-secrets.json"
            verb = "generated new" if created else "reused"
            self.note(f"{verb} development {', '.join(missing)} ({where})")
        else:
            self.note("secrets from the environment (none generated)")
        for name in ("KEY_ENCRYPTION_SECRET_PREVIOUS", "PROXY_SIGNING_KEY_PREVIOUS"):
            if os.environ.get(name):
                given[name] = os.environ[name]
        given["LEDGER_SIGNING_KEY"] = self._ledger_key(production)
        return given

    def _ledger_key(self, production: bool) -> str:
        """The auditor's ledger signing seed (given, or generated once and kept 0600), with
        its public half in `ledger/verify.keys` so `keyveil audit verify` needs no flags."""
        seed = os.environ.get("LEDGER_SIGNING_KEY", "")
        if not seed and production:
            raise StackError("LEDGER_SIGNING_KEY must be set in production")
        if not seed:
            stored, _ = self._state_file(
                "ledger-key.json", {"seed": LedgerSigner.generate().seed_b64()}
            )
            seed = stored["seed"]
        ledger = self.options.state_dir / "ledger"
        (ledger / "checkpoints").mkdir(parents=True, exist_ok=True)
        (self.options.state_dir / STATE_VERIFY_KEYS).write_text(
            LedgerSigner.from_seed(seed).public_key_b64 + "\n"
        )
        return seed

    # --- infrastructure --------------------------------------------------------------

    def start_nats(self) -> tuple[str, dict[str, str] | None]:
        """NATS_URL as given, or a local nats-server with one user per service.

        Either way the streams are created first (`keyveil bootstrap`): services never
        create them. A given NATS_URL is bootstrapped with KEYVEIL_BOOTSTRAP_NATS_USER /
        _PASSWORD when set, else without credentials (a development server).
        """
        if os.environ.get("NATS_URL"):
            url = os.environ["NATS_URL"]
            try:
                bootstrap_nats(
                    url,
                    user=os.environ.get("KEYVEIL_BOOTSTRAP_NATS_USER"),
                    password=os.environ.get("KEYVEIL_BOOTSTRAP_NATS_PASSWORD"),
                    replicas=_replicas(),
                )
            except Exception as exc:  # the operator may have bootstrapped it already
                print(
                    f"keyveil up: could not bootstrap the streams on NATS_URL "
                    f"({type(exc).__name__}); run `keyveil bootstrap` with the bootstrap login"
                )
            return url, None
        passwords, _ = self._state_file(
            "nats-passwords.json", {user: nats_password() for user in NATS_USERS}
        )
        shutil.copyfile(NATS_AUTH_CONF, self.options.state_dir / "auth.conf")
        config = self.options.state_dir / "nats.conf"
        config.write_text('include "auth.conf"\n')
        env = {f"KEYVEIL_NATS_PASSWORD_{u.upper()}": p for u, p in passwords.items()}
        server = start_nats(self.options.state_dir, config=config, env=env, tied_to_parent=True)
        self._adopt(server)
        lines = bootstrap_nats(
            server.url, user="bootstrap", password=passwords["bootstrap"], replicas=_replicas()
        )
        for line in lines:
            log.info("bootstrap: %s", line)
        for user in ("operator", "observer", "bootstrap"):
            credential = self.options.state_dir / f"{user}-credential.json"
            self._write_private(
                credential, {"url": server.url, "user": user, "password": passwords[user]}
            )
            self.info[f"{user}_credential"] = str(credential)
        return server.url, passwords

    def start_redis(self) -> str:
        """REDIS_URL as given, or a local server that requires a generated password."""
        if os.environ.get("REDIS_URL"):
            return os.environ["REDIS_URL"]
        password, _ = self._state_file("redis-password.json", {"password": nats_password()})
        server = start_redis(
            self.options.state_dir, password=password["password"], tied_to_parent=True
        )
        self._adopt(server)
        return server.url

    def _adopt(self, server: ServerProcess) -> None:
        """Supervise a server we started like any other child."""
        managed = Managed(
            name=server.name,
            argv=server.argv,
            env={**minimal_environ(), **server.env},
            log_path=server.log_path,
            port=server.port,
            process=server.process,
            server=server,
        )
        managed.started_at = time.monotonic()
        self.children.append(managed)

    def _write_private(self, path: Path, data: Mapping[str, Any]) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(dict(data), out, indent=2)

    # --- services --------------------------------------------------------------------

    def note(self, line: str) -> None:
        self.notes.append(line)
        say(f"keyveil up: {line}")

    def _port(self, offset: int) -> int:
        return free_port() if self.options.base_port == 0 else self.options.base_port + offset

    def choose_ports(self) -> dict[str, int]:
        """Every service port, refused up front when something already listens there."""
        opts = self.options
        ports = {"token": self._port(0), "proxy": self._port(1)}
        ports.update({f"proxy-{i + 1}": self._port(20 + i) for i in range(1, opts.proxy_replicas)})
        ports.update(keymanager=self._port(2), auditor=self._port(3))
        if opts.fake_upstream:
            ports["fake-upstream"] = self._port(10)
        for name, port in ports.items():
            if port_in_use(port):
                raise StackError(
                    f"port {port} ({name}) is already in use, perhaps by another keyveil up; "
                    "stop it, or use --base-port 0 to pick free ports"
                )
        return ports

    def _service(
        self, name: str, module: str, port: int, env: Mapping[str, str], logs: Path
    ) -> Managed:
        child_env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_VARIABLES}
        child_env.update(env)
        child_env["KEYVEIL_PORT"] = str(port)
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        return Managed(
            name=name,
            argv=[sys.executable, "-m", module],
            env=child_env,
            log_path=logs / f"{name}.log",
            port=port,
        )

    def plan(self) -> None:
        """Start the infrastructure and decide every service's environment."""
        opts = self.options
        opts.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(opts.state_dir, 0o700)
        logs = opts.state_dir / "logs"
        logs.mkdir(exist_ok=True)
        ports = self.choose_ports()
        environment = parse_environment(
            os.environ.get("NODE_ENV") or os.environ.get("APP_ENV") or "development"
        )
        production = environment is Environment.production
        keys = self.development_secrets(production)
        nats_url, passwords = self.start_nats()
        redis_url = self.start_redis()

        provider_key = os.environ.get("OPENAI_API_KEY", "")
        base_url = os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")
        demo = opts.demo
        if opts.fake_upstream:
            fake_port = ports["fake-upstream"]
            fake = Managed(
                name="fake-upstream",
                argv=[
                    sys.executable,
                    "-m",
                    "shared.testing.fake_upstream",
                    "--port",
                    str(fake_port),
                ],
                env=minimal_environ(),
                log_path=logs / "fake-upstream.log",
                port=fake_port,
            )
            fake.start()
            self.children.append(fake)
            try:
                wait_for_port(fake_port, process=fake.process)
            except (RuntimeError, TimeoutError) as exc:
                raise StackError(
                    f"the fake upstream did not start ({exc}); see {fake.log_path}"
                ) from None
            base_url = f"{fake.url}/v1"
            self.info["fake_upstream_url"] = fake.url
            if not provider_key:
                # Kept across restarts: a new key each time would be a rotation each time.
                stored, created = self._state_file(
                    "fake-upstream-key.json",
                    {"key": f"sk-keyveil-dev-{secrets.token_urlsafe(24)}"},
                )
                provider_key = stored["key"]
                verb = "generated a new" if created else "reused the"
                self.note(f"{verb} development provider key for the fake upstream")
        elif not provider_key and not demo:
            demo = True
            self.note("OPENAI_API_KEY is not set, so running in DEMO mode (no upstream)")

        token_port, keymanager_port, auditor_port = (
            ports["token"],
            ports["keymanager"],
            ports["auditor"],
        )
        proxy_ports = [ports["proxy"]] + [
            ports[f"proxy-{i + 1}"] for i in range(1, opts.proxy_replicas)
        ]
        proxy_url = f"http://127.0.0.1:{proxy_ports[0]}"
        # The demo page and the README examples call from the token service's own origin.
        origins = os.environ.get("ALLOWED_ORIGINS") or (
            f"http://localhost:{token_port},http://127.0.0.1:{token_port}"
        )

        def nats_env(user: str) -> dict[str, str]:
            env = {"NATS_URL": nats_url}
            if passwords is not None:
                env.update(NATS_USER=user, NATS_PASSWORD=passwords[user])
            return env

        edge = {
            "REDIS_URL": redis_url,
            "OPENAI_BASE_URL": base_url,
            "ALLOWED_ORIGINS": origins,
            "VOICE_AGENT_DEMO_MODE": "true" if demo else "false",
            "PROXY_SIGNING_KEY": keys["PROXY_SIGNING_KEY"],
            **{k: v for k, v in keys.items() if k == "PROXY_SIGNING_KEY_PREVIOUS"},
            # Token and proxy must hash principals with the same key (if one is given).
            **{k: os.environ[k] for k in ("KEYVEIL_PRINCIPAL_KEY",) if os.environ.get(k)},
        }
        token_only = {k: os.environ[k] for k in ("KEYVEIL_ASSERTION_KEY",) if os.environ.get(k)}
        keymanager_env = {
            **nats_env("keymanager"),
            "KEY_ENCRYPTION_SECRET": keys["KEY_ENCRYPTION_SECRET"],
            **{k: v for k, v in keys.items() if k == "KEY_ENCRYPTION_SECRET_PREVIOUS"},
        }
        if provider_key:
            keymanager_env["OPENAI_API_KEY"] = provider_key
        self.children.append(
            self._service(
                "keymanager", "services.keymanager", keymanager_port, keymanager_env, logs
            )
        )
        self.children.append(
            self._service(
                "token",
                "services.token",
                token_port,
                {**nats_env("token"), **edge, **token_only, "PROXY_PUBLIC_URL": proxy_url},
                logs,
            )
        )
        # Unacknowledged usage events survive a killed proxy: its successor replays them.
        outbox = {
            "PROXY_OUTBOX_DIR": os.environ.get("PROXY_OUTBOX_DIR") or str(opts.state_dir / "outbox")
        }
        for i, port in enumerate(proxy_ports):
            name = "proxy" if i == 0 else f"proxy-{i + 1}"
            self.children.append(
                self._service(
                    name, "services.proxy", port, {**nats_env("proxy"), **edge, **outbox}, logs
                )
            )
        auditor_env = {
            **nats_env("auditor"),
            "LEDGER_SIGNING_KEY": keys["LEDGER_SIGNING_KEY"],
            "LEDGER_CHECKPOINT_DIR": str((opts.state_dir / STATE_CHECKPOINTS).resolve()),
        }
        self.children.append(
            self._service("auditor", "services.auditor", auditor_port, auditor_env, logs)
        )
        self.info.update(
            state_dir=str(opts.state_dir.resolve()),
            token_url=f"http://127.0.0.1:{token_port}",
            proxy_url=proxy_url,
            proxy_urls=[f"http://127.0.0.1:{p}" for p in proxy_ports],
            keymanager_url=f"http://127.0.0.1:{keymanager_port}",
            auditor_url=f"http://127.0.0.1:{auditor_port}",
            # services/token/demo.py serves the page in development or demo mode only.
            demo_page_url=f"http://localhost:{token_port}/demo/"
            if demo or environment is Environment.development
            else None,
            nats_url=nats_url,
            redis_url=redis_url,
            openai_base_url=base_url,
            demo=demo,
        )

    def write_stack_json(self) -> None:
        services = [c for c in self.children if c.server is None and c.name != "fake-upstream"]
        self.info.update(
            ready=self.ready,
            metrics_urls={c.name: f"{c.url}/metrics" for c in services},
            pids={c.name: c.process.pid for c in self.children if c.process},
            logs={c.name: str(c.log_path) for c in self.children},
            restarts={c.name: c.restarts for c in self.children},
            supervisor_pid=os.getpid(),
        )
        path = self.options.state_dir / "stack.json"
        tmp = path.with_suffix(".tmp")
        self._write_private(tmp, self.info)  # it names the Redis URL with its password
        tmp.replace(path)

    @staticmethod
    def answers_as_itself(client: httpx.Client, child: Managed) -> bool:
        """`child` itself (its pid in /healthz, not another process on its port) is ready."""
        if child.process is None or not child.alive():
            return False
        health = client.get(f"{child.url}/healthz")
        instance = str(health.json().get("instance", "")) if health.status_code == 200 else ""
        if instance.rsplit(":", 1)[-1] != str(child.process.pid):
            return False
        return client.get(f"{child.url}/readyz").status_code == 200

    def wait_ready(self) -> bool:
        deadline = time.monotonic() + self.options.ready_timeout_s
        pending = [c for c in self.children if c.server is None and c.name != "fake-upstream"]
        with httpx.Client(timeout=1.0) as client:
            while pending and time.monotonic() < deadline and not self.stopping:
                self.supervise_once()
                for child in list(pending):
                    try:
                        if self.answers_as_itself(client, child):
                            pending.remove(child)
                    except (httpx.HTTPError, ValueError):
                        pass
                time.sleep(0.2)
        if not self.stopping:
            for child in pending:
                say(f"keyveil up: {child.name} is not ready; see {child.log_path}")
        return not pending

    def supervise_once(self) -> None:
        """Restart any child that died, with a backoff that resets after a healthy spell."""
        now = time.monotonic()
        for child in self.children:
            if child.alive() or self.stopping:
                continue
            if child.fatal is not None:
                continue
            if child.next_start == 0.0:
                code = child.process.returncode if child.process else None
                if code == CONFIG_EXIT_CODE and child.server is None:
                    # Restarting cannot fix a refused configuration: say why and stop.
                    child.fatal = last_error_line(child.log_path) or "configuration refused"
                    say(f"keyveil up: {child.name} refused its configuration: {child.fatal}")
                    self.failed = f"{child.name} refused its configuration (see {child.log_path})"
                    self.stopping = True
                    return
                healthy_for = now - child.started_at
                backoff = 0.5 if healthy_for > 30 else min(2.0**child.restarts, 10.0)
                child.next_start = now + backoff
                reason = last_error_line(child.log_path)[:200]
                say(
                    f"keyveil up: {child.name} exited ({code}); restarting in {backoff:.1f}s"
                    + (f"; last log line: {reason}" if reason else "")
                )
            elif now >= child.next_start:
                child.restarts += 1
                child.next_start = 0.0
                child.start()
                self.write_stack_json()

    def stop_all(self) -> None:
        self.stopping = True
        # Services first (they drain NATS and flush events), then the servers.
        for child in reversed([c for c in self.children if c.server is None]):
            child.stop()
        for child in [c for c in self.children if c.server is not None]:
            child.stop()


def _replicas() -> int:
    """Stream replicas, as the services are told (JETSTREAM_REPLICAS)."""
    value = os.environ.get("JETSTREAM_REPLICAS", "1")
    return int(value) if value.isdigit() and 1 <= int(value) <= 5 else 1


def _refuse_a_second_supervisor(state_dir: Path) -> None:
    path = state_dir / "stack.json"
    try:
        pid = int(json.loads(path.read_text()).get("supervisor_pid", 0))
    except (OSError, ValueError, AttributeError):
        return
    if pid and pid != os.getpid():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)  # stale: its supervisor is gone
            return
        except PermissionError:
            pass
        raise StackError(
            f"another keyveil up (pid {pid}) runs with state directory {state_dir}; "
            "stop it, or use --state-dir with another directory"
        )


def _summary(stack: Stack) -> list[str]:
    info = stack.info
    lines = [f"token service   {info['token_url']}  (POST /api/voice-agent/secure-token)"]
    if info.get("demo_page_url"):
        lines.insert(0, f"demo page       {info['demo_page_url']}")
    lines.append(f"proxy           {', '.join(info['proxy_urls'])}/api/voice-agent/proxy/v1")
    lines += [
        f"metrics         {url}  ({name})" for name, url in info.get("metrics_urls", {}).items()
    ]
    lines.append(f"stack.json      {stack.options.state_dir / 'stack.json'}")
    lines += stack.notes
    return [f"keyveil up:   {line}" for line in lines]


def run_stack(options: StackOptions) -> int:
    options.state_dir = options.state_dir.resolve()  # stack.json names absolute paths
    stack = Stack(options)

    def request_stop(signum: int, _frame: object) -> None:
        stack.stopping = True

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, request_stop)
    try:
        _refuse_a_second_supervisor(options.state_dir)
    except StackError as exc:
        say(f"keyveil up: {exc}")
        return 1
    started = False
    try:
        stack.plan()
        started = True
        for child in stack.children:
            if not child.alive():
                child.start()
        stack.write_stack_json()
        stack.ready = ready = stack.wait_ready()
        stack.write_stack_json()
        if stack.failed is None and not stack.stopping:
            say(json.dumps({k: stack.info[k] for k in ("token_url", "proxy_urls", "demo")}))
            for line in _summary(stack):
                say(line)
            state = "ready" if ready else "started, not all ready"
            say(f"keyveil up: {state}; Ctrl-C stops")
        while not stack.stopping:
            stack.supervise_once()
            time.sleep(0.2)
    except StackError as exc:
        stack.failed = str(exc)
        say(f"keyveil up: {exc}")
    except (RuntimeError, TimeoutError, OSError) as exc:  # NATS or Redis did not come up
        stack.failed = f"could not start ({type(exc).__name__}: {exc}); logs in {options.state_dir}"
        say(f"keyveil up: {stack.failed}")
    finally:
        if started or stack.children:
            say("keyveil up: stopping")
        stack.stop_all()
        (options.state_dir / "stack.json").unlink(missing_ok=True)
    if stack.failed is not None:
        say(f"keyveil up: failed: {stack.failed}")
        return 1
    return 0
