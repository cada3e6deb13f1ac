"""`keyveil up` cannot lie: its ports, its own processes, a refused configuration, signals.

One stack on fixed ports serves the module: the README's Python examples run against it
as written (only the ports differ), a second `keyveil up` on the same ports is refused,
and SIGHUP (a closed terminal) stops every child.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from keyveil.stack import port_in_use
from tests.stack import Stack, running_stack
from tests.support import REPO, TEST_PROVIDER_KEY

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

_UP = (sys.executable, "-m", "keyveil.cli", "up")
OFFSETS = (0, 1, 2, 3, 10)  # token, proxy, key-manager, auditor, fake upstream


def _free_base_port() -> int:
    for _ in range(200):
        base = random.randrange(20_000, 60_000, 50)
        if not any(port_in_use(base + offset) for offset in OFFSETS):
            return base
    raise RuntimeError("no free block of ports")


@pytest.fixture(scope="module")
def base_port() -> int:
    return _free_base_port()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, base_port: int) -> Iterator[Stack]:
    # ALLOWED_ORIGINS unset: the defaults of `make up`, which the README examples rely on.
    args = ("--fake-upstream", "--base-port", str(base_port))
    with running_stack(
        tmp_path_factory.mktemp("up"), args=args, env={"ALLOWED_ORIGINS": ""}
    ) as running:
        yield running


def _cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "REDIS_"))}
    env.update(extra)
    return env


def test_the_console_says_what_to_open_and_where_secrets_came_from(stack: Stack) -> None:
    console = (stack.state_dir / "up.log").read_text()
    token = stack.url("token")
    for needle in (
        f"demo page       http://localhost:{urlsplit(token).port}/demo/",
        f"token service   {token}",
        f"proxy           {stack.url('proxy')}/api/voice-agent/proxy/v1",
        f"metrics         {stack.url('auditor')}/metrics  (auditor)",
        "generated new development KEY_ENCRYPTION_SECRET, PROXY_SIGNING_KEY",
        "ready; Ctrl-C stops",
    ):
        assert needle in console, needle


def test_stack_json_paths_are_absolute_and_readiness_is_the_own_process(stack: Stack) -> None:
    info = stack.info
    assert Path(info["state_dir"]).is_absolute()
    for path in [*info["logs"].values(), info["operator_credential"]]:
        assert Path(path).is_absolute(), path
    for name in ("token", "proxy", "keymanager", "auditor"):
        url = info["metrics_urls"][name].removesuffix("/metrics")
        instance = httpx.get(f"{url}/healthz", timeout=5).json()["instance"]
        assert instance.endswith(f":{info['pids'][name]}"), (name, instance)
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
        assert re.search(rf'keyveil_build_info\{{[^}}]*service="{name}"[^}}]*\}} 1\.0', metrics)


def test_a_second_stack_on_the_same_ports_exits_naming_the_port(
    stack: Stack, base_port: int, tmp_path: Path
) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [*_UP, "--base-port", str(base_port), "--state-dir", str(tmp_path / "second")],
        env=_cli_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert f"port {base_port} (token) is already in use" in output
    assert "--base-port 0" in output
    assert "Traceback" not in output
    assert time.monotonic() - started < 30
    assert stack.process.poll() is None  # the first one is untouched


def _readme_examples() -> list[str]:
    readme = (REPO / "README.md").read_text()
    clients = readme[readme.index("## Clients") :]
    return re.findall(r"```python\n(.*?)```", clients, flags=re.DOTALL)


def _local_ports(code: str, stack: Stack) -> str:
    """The README names `make up`'s default ports; this stack runs on others."""
    token, proxy = urlsplit(stack.url("token")), urlsplit(stack.url("proxy"))
    code = code.replace("127.0.0.1:8080", token.netloc).replace("127.0.0.1:8081", proxy.netloc)
    return code.replace("localhost:8080", f"localhost:{token.port}")


def test_a_refused_origin_names_the_variable_to_set(stack: Stack) -> None:
    answer = httpx.post(
        f"{stack.url('token')}/api/voice-agent/secure-token",
        json={"mode": "proxy"},
        headers={"Origin": "https://app.test"},
        timeout=10,
    )
    assert answer.status_code == 403
    error = answer.json()["error"]
    assert error["code"] == "origin_forbidden"
    assert "ALLOWED_ORIGINS" in error["message"]


def test_the_readme_python_examples_run_as_written(stack: Stack) -> None:
    sdk, openai_package = _readme_examples()
    assert "await" in sdk
    namespace: dict[str, object] = {}
    exec(  # the README's own text
        "async def _example():\n" + textwrap.indent(_local_ports(sdk, stack), "    "),
        namespace,
    )
    asyncio.run(namespace["_example"]())  # type: ignore[operator]
    exec(_local_ports(openai_package, stack), {"__name__": "readme"})
    calls = httpx.get(f"{stack.info['fake_upstream_url']}/_fake/calls").json()["calls"]
    paths = [call["path"] for call in calls]
    assert paths.count("/v1/chat/completions") >= 3  # chat, streamed chat, openai package
    assert "/v1/audio/speech" in paths
    metrics = httpx.get(f"{stack.url('proxy')}/metrics", timeout=5).text
    assert 'keyveil_proxy_upstream_responses_total{status="200",status_class="2xx"}' in metrics


def test_sighup_stops_every_child(stack: Stack) -> None:
    pids = [int(p) for p in stack.info["pids"].values()]
    assert len(pids) >= 6  # nats, redis, fake upstream, four services
    stack.process.send_signal(signal.SIGHUP)
    assert stack.process.wait(60) == 0
    deadline = time.monotonic() + 20
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _running(pid)]
        time.sleep(0.2)
    assert alive == []
    assert not (stack.state_dir / "stack.json").exists()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())


def test_a_refused_configuration_ends_the_stack_with_its_error_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    names = ("KEY_ENCRYPTION_SECRET", "PROXY_SIGNING_KEY")
    kept = {name: secrets.token_urlsafe(32) for name in names}
    (state / "dev-secrets.json").write_text(json.dumps(kept))
    done = subprocess.run(
        [*_UP, "--base-port", "0", "--state-dir", str(state)],
        env=_cli_env(LOG_LEVEL="LOUD", OPENAI_API_KEY=TEST_PROVIDER_KEY),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "reused development KEY_ENCRYPTION_SECRET, PROXY_SIGNING_KEY" in output
    assert re.search(
        r"refused its configuration: keyveil: invalid configuration: LOG_LEVEL: ", output
    ), output
    assert "restarting" not in output
    assert "Traceback" not in output
    assert "LOUD" not in output.replace("LOG_LEVEL=LOUD", "")
    assert not (state / "stack.json").exists()
    leftovers = [
        p for p in Path("/proc").glob("[0-9]*") if _cmdline_mentions(p, str(state)) and p.exists()
    ]
    assert leftovers == []


def _cmdline_mentions(proc: Path, needle: str) -> bool:
    try:
        return needle in (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def test_children_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    """kill -9 of `keyveil up` itself (no chance to clean up) still ends every child."""
    with running_stack(tmp_path, args=()) as local:
        pids = [int(p) for p in local.info["pids"].values()]
        assert len(pids) >= 6  # nats, redis, four services
        local.process.kill()
        local.process.wait(10)
        deadline = time.monotonic() + 30
        alive = pids
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if _running(pid)]
            time.sleep(0.2)
        assert alive == []
