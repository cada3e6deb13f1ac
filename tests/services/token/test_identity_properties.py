"""Property: whatever the JWT header and claims, a login is accepted or refused with a 401.

Fuzzed tokens are checked by the real OIDC authenticator against a real local JWKS
(keys cached), both as tokens signed with the issuer's key (so claim checks run)
and as hand-assembled ones with arbitrary headers and signatures.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.token.identity import Authenticator, LoginError, authenticator_for
from services.token.settings import Settings
from shared.principals import Principal
from shared.settings import load_settings
from tests.services.token.issuer import TestIssuer
from tests.support import TEST_PROXY_SIGNING_KEY

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
ALGS = ["none", "None", "HS256", "HS512", "RS256", "RS512", "ES256", "EdDSA", "PS256", "", "x"]


@pytest.fixture(scope="module")
def idp() -> Iterator[TestIssuer]:
    issuer = TestIssuer()
    yield issuer
    issuer.close()


@pytest.fixture(scope="module")
def checked(idp: TestIssuer) -> Iterator[tuple[asyncio.AbstractEventLoop, Authenticator]]:
    settings = load_settings(
        Settings,
        PROXY_SIGNING_KEY=TEST_PROXY_SIGNING_KEY,
        KEYVEIL_AUTH_MODE="oidc",
        OIDC_ISSUER=idp.issuer,
        OIDC_AUDIENCE=idp.audience,
        OIDC_JWKS_MIN_REFRESH_S=3600,
    )
    auth = authenticator_for(settings, known_tiers=lambda: frozenset({"pro"}))
    loop = asyncio.new_event_loop()
    good = loop.run_until_complete(_check(auth, idp.login()))
    assert isinstance(good, Principal)  # keys are cached from here on
    yield loop, auth
    loop.close()


async def _check(auth: Authenticator, token: str) -> Principal | LoginError:
    try:
        return await auth.authenticate({"authorization": f"Bearer {token}"}, origin=None)
    except LoginError as exc:
        return exc


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


claims = st.fixed_dictionaries(
    {},
    optional={
        "iss": json_values,
        "aud": json_values,
        "sub": json_values,
        "exp": json_values,
        "nbf": json_values,
        "iat": json_values,
        "tier": json_values,
        "app": json_values,
    },
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from(ALGS) | json_values,
        "kid": json_values,
        "typ": json_values,
        "crit": json_values,
        "jku": st.just("https://evil.example/jwks"),
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=headers,
    body=claims,
    base=st.booleans(),
    signature=st.binary(max_size=300),
    junk=st.text(max_size=30),
)
def test_hand_built_tokens_are_refused_with_a_401(
    checked: tuple[asyncio.AbstractEventLoop, Authenticator],
    idp: TestIssuer,
    header: dict[str, Any],
    body: dict[str, Any],
    base: bool,
    signature: bytes,
    junk: str,
) -> None:
    loop, auth = checked
    payload = {**idp.claims(), **body} if base else body
    token = ".".join(
        [_b64(json.dumps(header).encode()), _b64(json.dumps(payload).encode()), _b64(signature)]
    )
    for candidate in (token, token + junk, junk):
        outcome = loop.run_until_complete(_check(auth, candidate))
        assert isinstance(outcome, LoginError), outcome  # no valid signature: never accepted
        assert outcome.status == 401
        assert outcome.code in {"login_invalid", "login_expired", "login_required"}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=claims, extra_header=st.dictionaries(st.sampled_from(["typ", "cty", "x"]), json_scalars)
)
def test_signed_tokens_with_any_claims_are_accepted_or_refused_with_a_401(
    checked: tuple[asyncio.AbstractEventLoop, Authenticator],
    idp: TestIssuer,
    body: dict[str, Any],
    extra_header: dict[str, Any],
) -> None:
    loop, auth = checked
    payload = {**idp.claims(), **body}
    try:
        token = jwt.encode(
            payload,
            idp.key.private,
            algorithm="RS256",
            headers={"kid": idp.key.kid, **extra_header},
        )
    except (TypeError, ValueError, jwt.PyJWTError):
        return  # PyJWT would not even sign it
    outcome = loop.run_until_complete(_check(auth, token))
    if isinstance(outcome, Principal):
        assert isinstance(payload.get("sub"), str)
        assert outcome.sub is not None
        assert outcome.sub != payload["sub"]
    else:
        assert outcome.status == 401
