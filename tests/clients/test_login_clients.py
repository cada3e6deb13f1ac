"""The clients pass the app's login to a real token service process in oidc mode.

keyveil.js `getIdToken` runs unmodified under node (the only shim is the `Origin`
header a browser adds to every cross-origin fetch); the Python SDK's sync flow too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyveil.client import AuthenticationError, TokenSource
from keyveil.servers import ServerProcess, start_nats
from shared.principals import PrincipalHasher
from shared.tokens import TokenKeyring
from tests.services.token.issuer import TestIssuer
from tests.support import REPO, TEST_PROXY_SIGNING_KEY, ServiceProcess

pytestmark = [pytest.mark.slow]

ORIGIN = "https://app.keyveil.test"
NODE = shutil.which("node")

SCRIPT = """
const [moduleUrl, tokenUrl, origin, first, second] = process.argv.slice(2);
const { KeyveilClient } = await import(moduleUrl);
const realFetch = globalThis.fetch;
globalThis.fetch = (url, init = {}) =>
  realFetch(url, { ...init, headers: { ...init.headers, Origin: origin } });  // the browser's part

let login = first;
const kv = new KeyveilClient({ tokenUrl, getIdToken: async () => login });
const a = await kv.requestToken();
const again = await kv.requestToken();
login = second;
const b = await kv.requestToken();
let refused = null;
try {
  await new KeyveilClient({ tokenUrl, maxAttempts: 1 }).requestToken();
} catch (error) {
  refused = { status: error.status, code: error.code };
}
console.log(JSON.stringify({
  first: a.token, same: again === a, second: b.token, fetches: kv.tokenFetches, refused,
}));
"""


@pytest.fixture(scope="module")
def idp() -> Iterator[TestIssuer]:
    issuer = TestIssuer()
    yield issuer
    issuer.close()


@pytest.fixture(scope="module")
def token_service(
    idp: TestIssuer, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    state = tmp_path_factory.mktemp("browser-login")
    nats_server: ServerProcess = start_nats(state, streams=True)
    env = {
        "NATS_URL": nats_server.url,
        "REDIS_URL": redis_url,
        "PROXY_SIGNING_KEY": TEST_PROXY_SIGNING_KEY,
        "ALLOWED_ORIGINS": ORIGIN,
        "KEYVEIL_AUTH_MODE": "oidc",
        "OIDC_ISSUER": idp.issuer,
        "OIDC_AUDIENCE": idp.audience,
    }
    service = ServiceProcess("token", env, Path(state) / "token.log").start()
    try:
        yield service
    finally:
        service.stop()
        nats_server.stop()


def test_get_id_token_is_sent_and_a_changed_login_fetches_a_new_token(
    token_service: ServiceProcess, idp: TestIssuer, tmp_path: Path
) -> None:
    script = tmp_path / "login.mjs"
    script.write_text(SCRIPT)
    module = (REPO / "clients" / "browser" / "keyveil.js").as_uri()
    tokens_url = f"{token_service.url}/api/voice-agent/secure-token"
    first, second = idp.login(sub="ann"), idp.login(sub="ben")
    assert NODE is not None, "node is needed for the browser client's tests"
    done = subprocess.run(
        [NODE, str(script), module, tokens_url, ORIGIN, first, second],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["same"] is True
    assert result["fetches"] == 2
    assert result["refused"] == {"status": 401, "code": "login_required"}
    keyring = TokenKeyring(TEST_PROXY_SIGNING_KEY)
    hasher = PrincipalHasher.from_secrets(principal_key=None, signing_key=TEST_PROXY_SIGNING_KEY)
    assert keyring.verify(result["first"]).sub == hasher.hash("ann")
    assert keyring.verify(result["second"]).sub == hasher.hash("ben")


def test_the_python_sdk_sync_flow_sends_the_login_too(
    token_service: ServiceProcess, idp: TestIssuer
) -> None:
    current = {"login": idp.login(sub="sync-user")}
    tokens = TokenSource(token_service.url, origin=ORIGIN, auth=lambda: current["login"])
    first = tokens.get_sync()
    assert tokens.get_sync() is first
    current["login"] = idp.login(sub="sync-user-2")
    second = tokens.get_sync()
    assert tokens.fetches == 2
    keyring = TokenKeyring(TEST_PROXY_SIGNING_KEY)
    hasher = PrincipalHasher.from_secrets(principal_key=None, signing_key=TEST_PROXY_SIGNING_KEY)
    assert keyring.verify(first.token).sub == hasher.hash("sync-user")
    assert keyring.verify(second.token).sub == hasher.hash("sync-user-2")


def test_an_expired_login_is_asked_for_again_once(
    token_service: ServiceProcess, idp: TestIssuer
) -> None:
    now = int(time.time())
    expired = idp.login(sub="late", iat=now - 900, exp=now - 600)
    logins = iter([expired, idp.login(sub="late")])
    asked: list[str] = []

    def auth() -> str:
        asked.append(next(logins, asked[-1] if asked else expired))
        return asked[-1]

    token = TokenSource(token_service.url, origin=ORIGIN, auth=auth).get_sync()
    assert len(asked) == 2  # the expired one, then the refreshed one
    assert token.mode == "proxy"
    stuck = TokenSource(token_service.url, origin=ORIGIN, auth=lambda: expired)
    with pytest.raises(AuthenticationError) as refused:
        stuck.get_sync()
    assert refused.value.code == "login_expired"
