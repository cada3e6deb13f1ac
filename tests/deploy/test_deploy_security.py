"""Security properties of the deployment: who receives which secret, non-root, read-only
root, no capabilities, and a NetworkPolicy fence around every service."""

from __future__ import annotations

from typing import Any

from tests.deploy.conftest import KEK_OVERLAYS, SERVICES
from tests.deploy.kustomize import Doc

PROVIDER_SECRETS = {"OPENAI_API_KEY", "KEY_ENCRYPTION_SECRET", "KEY_ENCRYPTION_SECRET_PREVIOUS"}
SIGNING_SECRETS = {"PROXY_SIGNING_KEY", "PROXY_SIGNING_KEY_PREVIOUS"}
LEDGER_SECRETS = {"LEDGER_SIGNING_KEY"}


def by_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def component(doc: Doc) -> str:
    labels: dict[str, str] = doc["spec"]["template"]["metadata"]["labels"]
    return labels["app.kubernetes.io/component"]


def container_env(deployment: Doc) -> dict[str, dict[str, Any]]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in container.get("env", [])}


def secret_names(deployment: Doc) -> set[str]:
    spec = deployment["spec"]["template"]["spec"]
    names = set()
    for container in spec["containers"]:
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                names.add(source["secretRef"]["name"])
    for volume in spec.get("volumes", []):
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
    return names


# --- compose -------------------------------------------------------------------------------


def test_compose_gives_the_provider_key_to_the_keymanager_only(compose: dict[str, Any]) -> None:
    holders = {
        name
        for name, service in compose["services"].items()
        if PROVIDER_SECRETS & set(service.get("environment", {}))
    }
    assert holders == {"keymanager"}
    keymanager = compose["services"]["keymanager"]["environment"]
    assert {"OPENAI_API_KEY", "KEY_ENCRYPTION_SECRET"} <= set(keymanager)
    assert "env_file" not in str(compose)  # a shared env_file would hand it to everyone


def test_compose_gives_the_signing_key_to_token_and_proxy_only(compose: dict[str, Any]) -> None:
    holders = {
        name
        for name, service in compose["services"].items()
        if SIGNING_SECRETS & set(service.get("environment", {}))
    }
    assert holders == {"token", "proxy"}


def test_compose_gives_the_ledger_key_to_the_auditor_only(compose: dict[str, Any]) -> None:
    holders = {
        name
        for name, service in compose["services"].items()
        if LEDGER_SECRETS & set(service.get("environment", {}))
    }
    assert holders == {"auditor"}
    auditor = compose["services"]["auditor"]
    directory = auditor["environment"]["LEDGER_CHECKPOINT_DIR"]
    assert any(v.endswith(f":{directory}") for v in auditor["volumes"])  # survives restarts


def test_compose_each_service_has_its_own_nats_password(compose: dict[str, Any]) -> None:
    for name in SERVICES:
        env = compose["services"][name]["environment"]
        assert env["NATS_PASSWORD"].startswith(f"${{KEYVEIL_NATS_PASSWORD_{name.upper()}:?")


def test_compose_services_are_locked_down(compose: dict[str, Any]) -> None:
    for name in [*SERVICES, "fake-upstream"]:
        service = compose["services"][name]
        assert service["user"] == "10001:10001", name
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert any(t.startswith("/tmp") for t in service["tmpfs"]), name
        assert "ports" not in service, name  # reachable through the ingress only
        assert "privileged" not in service, name


# --- Kubernetes -----------------------------------------------------------------------------


def test_k8s_commits_no_secret_objects(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    assert by_kind(docs, "Secret") == []
    for deployment in by_kind(docs, "Deployment"):
        for name, env in container_env(deployment).items():
            if name in PROVIDER_SECRETS | SIGNING_SECRETS | LEDGER_SECRETS | {
                "NATS_PASSWORD",
                "REDIS_URL",
            }:
                assert "value" not in env, name
                assert env["valueFrom"]["secretKeyRef"]["name"].startswith("keyveil-")


def test_k8s_provider_secret_is_mounted_into_the_keymanager_only(
    overlay: tuple[str, list[Doc]],
) -> None:
    _, docs = overlay
    mounts = {component(d): secret_names(d) for d in by_kind(docs, "Deployment")}
    assert {c for c, names in mounts.items() if "keyveil-provider" in names} == {"keymanager"}
    assert {c for c, names in mounts.items() if "keyveil-signing" in names} == {"token", "proxy"}
    assert {c for c, names in mounts.items() if "keyveil-ledger" in names} == {"auditor"}
    for deployment in by_kind(docs, "Deployment"):
        env = container_env(deployment)
        has_provider_env = bool(PROVIDER_SECRETS & set(env))
        assert has_provider_env == (component(deployment) == "keymanager")
    for config in by_kind(docs, "ConfigMap"):
        assert not PROVIDER_SECRETS & set(config["data"])


def test_k8s_each_service_reads_only_its_own_nats_password(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    for deployment in by_kind(docs, "Deployment"):
        ref = container_env(deployment)["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "keyveil-nats", "key": component(deployment)}


def test_k8s_pods_are_non_root_read_only_and_capability_free(
    overlay: tuple[str, list[Doc]],
) -> None:
    _, docs = overlay
    for deployment in by_kind(docs, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        assert not pod.get("hostNetwork")
        assert not pod.get("hostPID")
        tmp_volumes = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["runAsNonRoot"] is True
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context.get("privileged", False) is False
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp
            assert tmp[0]["name"] in tmp_volumes


def test_k8s_namespace_enforces_restricted_pod_security(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    (namespace,) = by_kind(docs, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def policies_for(docs: list[Doc], name: str) -> list[Doc]:
    return [
        p
        for p in by_kind(docs, "NetworkPolicy")
        if p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component")
        == name
    ]


def sources(policy: Doc) -> list[dict[str, Any]]:
    return [peer for rule in policy["spec"].get("ingress", []) for peer in rule["from"]]


def namespace_of(peer: dict[str, Any]) -> str | None:
    labels: dict[str, str] = peer.get("namespaceSelector", {}).get("matchLabels", {})
    return labels.get("kubernetes.io/metadata.name")


def test_k8s_default_deny_covers_every_pod(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    deny = [
        p
        for p in by_kind(docs, "NetworkPolicy")
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert len(deny) == 1


def test_k8s_only_token_and_proxy_are_reachable_from_the_ingress(
    overlay: tuple[str, list[Doc]],
) -> None:
    _, docs = overlay
    for name in SERVICES:
        (policy,) = policies_for(docs, name)
        namespaces = {namespace_of(peer) for peer in sources(policy)}
        # No peer without a namespace selector: nothing in-namespace may call a service.
        assert None not in namespaces, name
        if name in ("token", "proxy"):
            assert namespaces == {"ingress-nginx", "monitoring"}, name
        else:
            assert namespaces == {"monitoring"}, name
        for rule in policy["spec"]["ingress"]:
            assert [p["port"] for p in rule["ports"]] == [SERVICES[name]], name


def test_k8s_egress_is_nats_redis_and_https_only_where_needed(
    overlay: tuple[str, list[Doc]],
) -> None:
    overlay_name, docs = overlay
    kek_port = {"vault-transit": 8200, "aws-kms": 443}.get(KEK_OVERLAYS.get(overlay_name, ""))
    for name in SERVICES:
        (policy,) = policies_for(docs, name)
        ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
        expected = {4222, 6379, 443} if name in ("token", "proxy") else {4222}
        if name == "keymanager" and kek_port is not None:
            expected = {4222, kek_port}  # the KEK provider, and nothing else
        assert ports == expected, name
        for rule in policy["spec"]["egress"]:
            for peer in rule["to"]:
                if "ipBlock" in peer:
                    assert "169.254.0.0/16" in peer["ipBlock"]["except"]
                    assert "10.0.0.0/8" in peer["ipBlock"]["except"]


def test_k8s_keymanager_and_auditor_have_no_ingress_route(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    backends = {
        path["backend"]["service"]["name"]
        for ingress in by_kind(docs, "Ingress")
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    }
    assert backends == {"keyveil-token", "keyveil-proxy"}


def test_k8s_remote_kek_overlays_hold_no_kek_secret(overlay: tuple[str, list[Doc]]) -> None:
    name, docs = overlay
    (keymanager,) = [d for d in by_kind(docs, "Deployment") if component(d) == "keymanager"]
    env = container_env(keymanager)
    provider = KEK_OVERLAYS.get(name)
    if provider is None:
        assert "KEY_ENCRYPTION_SECRET" in env
        assert "KEK_PROVIDER" not in env
        return
    assert env["KEK_PROVIDER"]["value"] == provider
    assert not {"KEY_ENCRYPTION_SECRET", "KEY_ENCRYPTION_SECRET_PREVIOUS"} & set(env)
    assert "OPENAI_API_KEY" in env  # the bootstrap key still comes from the provider Secret
    pod = keymanager["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    (account,) = [
        d for d in by_kind(docs, "ServiceAccount") if d["metadata"]["name"] == "keyveil-keymanager"
    ]
    if provider == "aws-kms":
        assert env["KMS_KEY_ID"]["value"]
        role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        assert role.startswith("arn:aws:iam::")
    else:
        assert env["VAULT_ADDR"]["value"].startswith("https://")
        assert env["VAULT_K8S_ROLE"]["value"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "vault-identity"]
        token = volume["projected"]["sources"][0]["serviceAccountToken"]
        assert token["audience"] == "vault"
        assert env["VAULT_K8S_TOKEN_PATH"]["value"] == "/var/run/secrets/vault/token"
