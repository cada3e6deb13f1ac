"""Behind an egress proxy the proxy's upstream goes through it, or the proxy refuses to start.

The token service's httpx honours HTTPS_PROXY; so does the proxy's httpx transport, which
UPSTREAM_TRANSPORT=auto picks exactly when an egress proxy applies to the upstream host.
The proxy's own HTTP/1.1 client connects directly, so UPSTREAM_TRANSPORT=http1 with a proxy
that applies (or a SOCKS proxy, which no transport here speaks) exits 2 naming the
variable: never one edge working and the other not. The proxied requests themselves are
in the conformance suite (test_transport.py); here, the proxy process end to end.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keyveil.servers import ServerProcess
from services.proxy.transport import EgressProxyError, TransportKind, choose_transport
from tests.support import TEST_PROXY_SIGNING_KEY, FakeUpstream, ServiceProcess

from .conftest import CHAT, Browser, chat_body, proxy_env
from .egress import EgressProxy

OPENAI = "https://api.openai.com/v1"
EGRESS = "http://egress:3128"


@pytest.mark.parametrize(
    ("base_url", "proxies", "variable"),
    [
        (OPENAI, {"https": EGRESS}, "HTTPS_PROXY"),
        (OPENAI, {"all": EGRESS}, "ALL_PROXY"),
        ("http://fake:9000/v1", {"http": EGRESS}, "HTTP_PROXY"),
        (OPENAI, {"https": EGRESS, "no": "example.com"}, "HTTPS_PROXY"),
        (OPENAI, {}, None),
        (OPENAI, {"http": EGRESS}, None),  # only for http:// upstreams
        (OPENAI, {"https": EGRESS, "no": "api.openai.com"}, None),
        (OPENAI, {"https": EGRESS, "no": ".openai.com"}, None),
        (OPENAI, {"https": EGRESS, "no": "localhost, openai.com"}, None),
        (OPENAI, {"https": EGRESS, "no": "*"}, None),
        (OPENAI, {"https": EGRESS, "no": "penai.com"}, "HTTPS_PROXY"),  # a suffix of labels
    ],
)
def test_which_egress_proxy_applies(
    base_url: str, proxies: dict[str, str], variable: str | None
) -> None:
    auto = choose_transport("auto", base_url, proxies)
    assert (auto.proxy.variable if auto.proxy else None) == variable
    assert auto.kind == ("httpx" if variable else "http1")
    if variable is None:
        assert choose_transport("http1", base_url, proxies).kind == "http1"
    else:
        with pytest.raises(EgressProxyError) as refused:
            choose_transport("http1", base_url, proxies)
        assert refused.value.variable == variable
    forced = choose_transport("httpx", base_url, proxies)
    assert forced.kind == "httpx"
    assert forced.proxy == auto.proxy


@pytest.mark.parametrize("setting", ["auto", "http1", "httpx"])
def test_a_socks_proxy_is_refused_whatever_the_transport(setting: TransportKind) -> None:
    with pytest.raises(EgressProxyError) as refused:
        choose_transport(setting, OPENAI, {"all": "socks5://egress:1080"})
    assert refused.value.variable == "ALL_PROXY"
    assert "NO_PROXY" in refused.value.rule


def test_the_logged_reason_never_shows_the_proxy_credentials() -> None:
    choice = choose_transport("auto", OPENAI, {"https": "http://user:s3cret@egress:3128"})
    assert choice.kind == "httpx"
    assert choice.reason == "HTTPS_PROXY applies to api.openai.com: via http://egress:3128"
    assert choice.proxy is not None
    assert choice.proxy.address == "http://egress:3128"
    assert "s3cret" not in repr(choice)


def test_a_proxy_without_a_scheme_is_an_http_proxy() -> None:
    choice = choose_transport("auto", OPENAI, {"https": "egress:3128"})
    assert choice.proxy is not None
    assert choice.proxy.url == "http://egress:3128"


def _start_proxy(**extra: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "PROXY_SIGNING_KEY": TEST_PROXY_SIGNING_KEY, **extra}
    return subprocess.run(
        [sys.executable, "-m", "services.proxy"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_http1_behind_an_egress_proxy_refuses_to_start_and_names_the_variable() -> None:
    done = _start_proxy(HTTPS_PROXY="http://egress.internal:3128", UPSTREAM_TRANSPORT="http1")
    assert done.returncode == 2
    assert "HTTPS_PROXY" in done.stderr
    assert "UPSTREAM_TRANSPORT" in done.stderr
    assert "NO_PROXY" in done.stderr


def test_an_unknown_transport_refuses_to_start() -> None:
    done = _start_proxy(UPSTREAM_TRANSPORT="curl")
    assert done.returncode == 2
    assert "UPSTREAM_TRANSPORT" in done.stderr


async def test_the_proxy_process_forwards_through_the_egress_proxy(
    proxy_nats: ServerProcess,
    redis_url: str,
    upstream: FakeUpstream,
    key_manager: ServiceProcess,
    tmp_path: Path,
) -> None:
    egress = EgressProxy()
    egress_url = await egress.start()
    env = proxy_env(proxy_nats.url, redis_url, upstream, HTTP_PROXY=egress_url, NO_PROXY="")
    service = ServiceProcess("proxy", env, tmp_path / "proxy.log")
    browser: Browser | None = None
    try:
        await asyncio.to_thread(service.start)  # the egress proxy keeps serving meanwhile
        browser = Browser(service.url)
        answer = await browser.post(CHAT, chat_body())
        assert answer.status_code == 200, answer.text
        streamed = await browser.post(CHAT, chat_body(stream=True))
        assert streamed.status_code == 200, streamed.text
        assert streamed.text.rstrip().endswith("data: [DONE]")
    finally:
        if browser is not None:
            await browser.close()
        await asyncio.to_thread(service.stop)
        await egress.stop()
    assert egress.targets == [f"{upstream.base_url}/chat/completions"] * 2
    assert [call["path"] for call in upstream.calls()] == ["/v1/chat/completions"] * 2
    assert "upstream transport: httpx (HTTP_PROXY applies to 127.0.0.1" in service.log()
