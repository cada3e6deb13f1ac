"""The Grafana dashboard and the alert rules only use metrics some service exports,
and the plain-Prometheus and PrometheusRule copies of the rules are the same rules."""

from __future__ import annotations

import json
import re

import yaml

from tests.support import REPO

DASHBOARD = REPO / "deploy/grafana/dashboards/keyveil.json"
RULES = REPO / "deploy/prometheus/rules.yml"
PROMETHEUS_RULE = REPO / "deploy/k8s/base/prometheusrule.yaml"
METRIC = re.compile(r"\b(keyveil_[a-z0-9_]+)")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def exported_metrics() -> set[str]:
    """Every keyveil_* family registered in the code, with counter/histogram series names."""
    names: set[str] = set()
    for path in [*REPO.glob("services/**/*.py"), *REPO.glob("shared/**/*.py")]:
        for name in re.findall(r'"(keyveil_[a-z0-9_]+)"', path.read_text()):
            names.add(name)
            if not name.endswith("_total"):
                names.add(f"{name}_total")  # prometheus_client appends it to counters
            names.update(f"{name}{s}" for s in HISTOGRAM_SUFFIXES)
    return names


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in board["annotations"]["list"] if "expr" in a]
    return exprs


def rule_groups(path: str) -> list[dict[str, object]]:
    data = yaml.safe_load((REPO / path).read_text())
    groups: list[dict[str, object]] = (
        data["spec"]["groups"] if data.get("kind") == "PrometheusRule" else data["groups"]
    )
    return groups


def balanced(expr: str) -> bool:
    depth = 0
    for ch in expr:
        depth += {"(": 1, ")": -1, "{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def test_dashboard_uses_only_exported_metrics() -> None:
    known = exported_metrics()
    used = {m for expr in dashboard_exprs() for m in METRIC.findall(expr)}
    assert used, "the dashboard queries nothing"
    assert used - known == set()


def test_dashboard_covers_red_per_service_tokens_rejections_alerts_leases() -> None:
    text = " ".join(dashboard_exprs())
    for needed in (
        "keyveil_token_issued_total",
        "keyveil_proxy_requests_total",
        "keyveil_proxy_request_duration_seconds_bucket",
        "keyveil_proxy_rejections_total",
        "keyveil_keymanager_leases_total",
        "keyveil_auditor_alerts_total",
        "keyveil_ratelimit_decisions_total",
        "keyveil_auth_failures_total",
        "by (mode)",
        "by (reason)",
    ):
        assert needed in text, needed
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert all(balanced(e) for e in dashboard_exprs())


def test_rules_are_the_same_in_both_forms_and_well_formed() -> None:
    plain = rule_groups("deploy/prometheus/rules.yml")
    operator = rule_groups("deploy/k8s/base/prometheusrule.yaml")
    assert plain == operator
    doc = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "PrometheusRule"
    known = exported_metrics()
    names = []
    for group in plain:
        for rule in group["rules"]:  # type: ignore[attr-defined]
            names.append(rule["alert"])
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"]
            assert balanced(rule["expr"]), rule["alert"]
            assert set(METRIC.findall(rule["expr"])) <= known, rule["alert"]
    assert len(names) == len(set(names))
    for page_on in ("KeyveilProxyHighErrorRate", "KeyveilSecurityAlertCritical",
                    "KeyveilEventsDropped", "KeyveilLeaseErrors"):  # fmt: skip
        assert page_on in names
