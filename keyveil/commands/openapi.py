"""`keyveil openapi token|proxy`: print a service's OpenAPI spec, built from its app.

The services serve no spec (`openapi_url=None`); this is how to get one. The spec does
not depend on the environment: the app is built from fixed placeholder settings and
nothing is started (no lifespan, no NATS, no Redis). docs/openapi/ keeps copies.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from fastapi import FastAPI
from pydantic import SecretStr

from shared.settings import Environment

__all__ = ["SERVICES", "build_app", "register", "spec", "spec_json"]

SERVICES = ("token", "proxy")
# Never used to sign anything: the app is built but not started.
_PLACEHOLDER_KEY = SecretStr("openapi-spec-placeholder-key-not-a-secret")


def build_app(service: str) -> FastAPI:
    """`service`'s app ("token" or "proxy") from placeholder settings, not started."""
    if service == "token":
        from services.token.app import create_app as token_app
        from services.token.settings import Settings as TokenSettings

        return token_app(
            TokenSettings.model_construct(
                node_env=Environment.production, proxy_signing_key=_PLACEHOLDER_KEY
            )
        )
    if service == "proxy":
        from services.proxy.app import create_app as proxy_app
        from services.proxy.settings import Settings as ProxySettings

        return proxy_app(
            ProxySettings.model_construct(
                node_env=Environment.production, proxy_signing_key=_PLACEHOLDER_KEY
            )
        )
    raise ValueError(f"unknown service {service!r}; expected one of {', '.join(SERVICES)}")


def spec(service: str) -> dict[str, Any]:
    """The OpenAPI document of `service`, generated from its app object."""
    return build_app(service).openapi()


def spec_json(service: str) -> str:
    """The spec as committed under docs/openapi/: sorted keys, two-space indent."""
    return json.dumps(spec(service), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _run(args: argparse.Namespace) -> int:
    print(spec_json(args.service), end="")
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "openapi", help="print the OpenAPI spec of the token or proxy HTTP API"
    )
    parser.add_argument("service", choices=SERVICES)
    parser.set_defaults(handler=_run)
