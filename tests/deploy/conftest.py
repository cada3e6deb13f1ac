"""Fixtures for the offline deployment checks: the repository's deploy files, parsed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.kustomize import Doc, build

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("dev", "prod", "prod-vault", "prod-aws-kms")
# Where the KEK lives, per overlay (no KEY_ENCRYPTION_SECRET beside a remote one).
KEK_OVERLAYS = {"prod-vault": "vault-transit", "prod-aws-kms": "aws-kms"}
SERVICES = {"token": 8080, "proxy": 8081, "keymanager": 8082, "auditor": 8083}


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return loaded


@pytest.fixture(scope="session", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    """(overlay name, the objects it renders), through the resolver kubectl is checked against."""
    name: str = request.param
    return name, build(K8S / "overlays" / name)
