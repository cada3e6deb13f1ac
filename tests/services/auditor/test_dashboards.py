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


# --- names AND labels, against what the services actually register ----------------------

# Labels Prometheus adds when it scrapes (target labels), not the services themselves.
TARGET_LABELS = {"instance", "job", "namespace", "pod", "service"}
SELECTOR = re.compile(r"\b(keyveil_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
TEMPLATE_LABEL = re.compile(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)")
LEGEND_LABEL = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")


def registered_metrics() -> dict[str, set[str]]:
    """Every keyveil_* series name the services' code registers, with its label names.

    Imports every module of services/ and shared/ and reads prometheus_client's registry:
    the names and labels a scrape of /metrics can show, not a regex over the source.
    """
    import importlib
    import pkgutil

    from prometheus_client import REGISTRY

    import services
    import shared

    for package in (services, shared):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if not module.name.endswith("__main__") and ".testing" not in module.name:
                importlib.import_module(module.name)
    found: dict[str, set[str]] = {}
    for collector, names in REGISTRY._collector_to_names.items():
        labels = set(getattr(collector, "_labelnames", ()))
        for name in names:
            if name.startswith("keyveil_"):
                found[name] = labels | ({"le"} if name.endswith("_bucket") else set())
    return found


def rule_items() -> list[tuple[str, str, str]]:
    """(where, expr, annotation text) for every alert rule."""
    items = []
    for group in rule_groups("deploy/prometheus/rules.yml"):
        for rule in group["rules"]:  # type: ignore[attr-defined]
            text = " ".join(str(v) for v in rule.get("annotations", {}).values())
            items.append((rule["alert"], rule["expr"], text))
    return items


def dashboard_items() -> list[tuple[str, str, str]]:
    board = json.loads(DASHBOARD.read_text())
    items = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            legend = target.get("legendFormat", "")
            items.append((panel["title"], target["expr"], legend))
    for annotation in board["annotations"]["list"]:
        if "expr" in annotation:
            text = f"{annotation.get('titleFormat', '')} {annotation.get('textFormat', '')}"
            items.append((annotation["name"], annotation["expr"], text))
    for variable in board["templating"]["list"]:
        items.append((f"${variable['name']}", variable["query"]["query"], ""))
    return items


def unknown_labels(where: str, expr: str, text: str, known: dict[str, set[str]]) -> list[str]:
    problems = []
    used_metrics = set(METRIC.findall(expr))
    problems += [f"{where}: no metric {m}" for m in sorted(used_metrics - set(known))]
    available = TARGET_LABELS.union(*(known.get(m, set()) for m in used_metrics))
    for metric, matchers in SELECTOR.findall(expr):
        for label in MATCHER.findall(matchers):
            if label not in known.get(metric, set()) | TARGET_LABELS:
                problems.append(f"{where}: {metric} has no label {label}")
    labels = {p.strip() for group in GROUPING.findall(expr) for p in group.split(",") if p.strip()}
    labels |= set(TEMPLATE_LABEL.findall(text)) | set(LEGEND_LABEL.findall(text))
    problems += [f"{where}: no metric here has label {lbl}" for lbl in sorted(labels - available)]
    return problems


def test_every_metric_and_label_the_dashboard_and_rules_use_is_registered() -> None:
    known = registered_metrics()
    assert "keyveil_build_info" in known
    assert known["keyveil_keymanager_admin_operations_total"] >= {"op", "result"}
    problems = [
        problem
        for where, expr, text in [*dashboard_items(), *rule_items()]
        for problem in unknown_labels(where, expr, text, known)
    ]
    assert problems == []


def test_the_label_check_catches_a_wrong_label() -> None:
    known = registered_metrics()
    expr = "sum by (operation, result) (rate(keyveil_keymanager_admin_operations_total[5m]))"
    assert unknown_labels("panel", expr, "", known) == ["panel: no metric here has label operation"]
    wrong = 'rate(keyveil_proxy_requests_total{status="500"}[5m])'
    assert unknown_labels("panel", wrong, "", known) == [
        "panel: keyveil_proxy_requests_total has no label status"
    ]


def test_the_dashboard_filters_by_namespace_and_instance() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert [v["name"] for v in board["templating"]["list"]] == ["namespace", "instance"]
    for where, expr, _ in dashboard_items():
        if where.startswith("$"):
            continue
        for _, matchers in SELECTOR.findall(expr):
            assert 'namespace=~"$namespace"' in matchers, where
            assert 'instance=~"$instance"' in matchers, where


def test_every_alert_rule_links_a_runbook_that_exists() -> None:
    base = "https://github.com/keyveil/keyveil/blob/main/"
    for group in rule_groups("deploy/prometheus/rules.yml"):
        for rule in group["rules"]:  # type: ignore[attr-defined]
            url = rule["annotations"]["runbook_url"]
            assert url == f"{base}deploy/runbooks/{rule['alert']}.md"
            page = REPO / url.removeprefix(base)
            assert page.read_text().startswith(f"# {rule['alert']}\n")
