"""The proxy refuses to start behind an egress proxy its upstream client cannot use.

The token service's httpx honours HTTPS_PROXY; the proxy's own HTTP/1.1 client
(services/proxy/http1.py) connects directly. Starting anyway would leave one edge
working and the other not, so the proxy exits 2 naming the variable.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services.proxy.settings import egress_proxy_problem
from tests.support import TEST_PROXY_SIGNING_KEY

OPENAI = "https://api.openai.com/v1"


@pytest.mark.parametrize(
    ("base_url", "proxies", "variable"),
    [
        (OPENAI, {"https": "http://egress:3128"}, "HTTPS_PROXY"),
        (OPENAI, {"all": "socks5://egress:1080"}, "ALL_PROXY"),
        ("http://fake:9000/v1", {"http": "http://egress:3128"}, "HTTP_PROXY"),
        (OPENAI, {"https": "http://egress:3128", "no": "example.com"}, "HTTPS_PROXY"),
        (OPENAI, {}, None),
        (OPENAI, {"http": "http://egress:3128"}, None),  # only for http:// upstreams
        (OPENAI, {"https": "http://egress:3128", "no": "api.openai.com"}, None),
        (OPENAI, {"https": "http://egress:3128", "no": ".openai.com"}, None),
        (OPENAI, {"https": "http://egress:3128", "no": "localhost, openai.com"}, None),
        (OPENAI, {"https": "http://egress:3128", "no": "*"}, None),
    ],
)
def test_egress_proxy_problem(base_url: str, proxies: dict[str, str], variable: str | None) -> None:
    problem = egress_proxy_problem(base_url, proxies)
    assert (problem[0] if problem else None) == variable


def test_the_proxy_process_refuses_to_start_and_names_the_variable() -> None:
    env = {
        "PATH": os.environ["PATH"],
        "PROXY_SIGNING_KEY": TEST_PROXY_SIGNING_KEY,
        "HTTPS_PROXY": "http://egress.internal:3128",
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.proxy"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "HTTPS_PROXY" in done.stderr
    assert "NO_PROXY" in done.stderr
