"""One parameter sets the public host everywhere; the alert rules reach a receiver."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from shared.settings import public_url_problem
from tests.deploy.conftest import K8S, OVERLAYS, REPO
from tests.deploy.kustomize import Doc


def _config(docs: list[Doc]) -> dict[str, str]:
    (config,) = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "keyveil-config"
    ]
    data: dict[str, str] = config["data"]
    return data


def _own_overlay(name: str) -> Path:
    """The overlay that sets the host: itself, or the overlay it builds on (prod-vault and
    prod-aws-kms are prod with another key custody, and inherit its host)."""
    folder = K8S / "overlays" / name
    while not (folder / "patch-config.yaml").exists():
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        (parent,) = [r for r in kustomization["resources"] if r.startswith("../")]
        folder = (folder / parent).resolve()
    return folder


def test_each_overlay_sets_ingress_hosts_and_the_public_url_from_one_host(
    overlay: tuple[str, list[Doc]],
) -> None:
    name, docs = overlay
    data = _config(docs)
    host = data["KEYVEIL_PUBLIC_HOST"]
    patch = yaml.safe_load((_own_overlay(name) / "patch-config.yaml").read_text())
    assert patch["data"]["KEYVEIL_PUBLIC_HOST"] == host  # set in the overlay, nowhere else
    url = data["PROXY_PUBLIC_URL"]
    assert urlsplit(url).hostname == host
    assert urlsplit(url).path == "/api/voice-agent/proxy/v1"
    assert public_url_problem(url) is None
    ingresses = [d for d in docs if d["kind"] == "Ingress"]
    assert len(ingresses) == 2
    for ingress in ingresses:
        assert [r["host"] for r in ingress["spec"]["rules"]] == [host]
        assert ingress["spec"]["tls"][0]["hosts"] == [host]


def test_the_overlays_share_one_replacement() -> None:
    copies = {(_own_overlay(o) / "public-host.yaml").read_text() for o in OVERLAYS}
    assert len(copies) == 1


def test_compose_derives_the_public_url_from_one_variable(compose: dict[str, Any]) -> None:
    token = compose["services"]["token"]["environment"]
    assert token["PROXY_PUBLIC_URL"] == (
        "${KEYVEIL_PUBLIC_URL:?set in .env}/api/voice-agent/proxy/v1"
    )
    assert "KEYVEIL_PUBLIC_URL=https://" in (REPO / "deploy/env.example").read_text()


def test_compose_prometheus_alerts_through_alertmanager_to_the_webhook(
    compose: dict[str, Any],
) -> None:
    prometheus = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    targets = [
        t
        for am in prometheus["alerting"]["alertmanagers"]
        for s in am["static_configs"]
        for t in s["targets"]
    ]
    assert targets == ["alertmanager:9093"]
    alertmanager = compose["services"]["alertmanager"]
    mounted = "./deploy/alertmanager/alertmanager.yml:/etc/alertmanager/alertmanager.yml:ro"
    assert mounted in alertmanager["volumes"]
    assert alertmanager["secrets"] == ["alert_webhook_url"]
    assert compose["secrets"]["alert_webhook_url"] == {"environment": "ALERT_WEBHOOK_URL"}
    config = yaml.safe_load((REPO / "deploy/alertmanager/alertmanager.yml").read_text())
    receivers = {r["name"]: r for r in config["receivers"]}
    assert config["route"]["receiver"] in receivers
    (slack,) = receivers[config["route"]["receiver"]]["slack_configs"]
    assert slack["api_url_file"] == "/run/secrets/alert_webhook_url"
    auditor = compose["services"]["auditor"]["environment"]
    assert auditor["ALERT_WEBHOOK_URL"] == "${ALERT_WEBHOOK_URL:-}"
