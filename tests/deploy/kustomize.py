"""Build a kustomize overlay: with `kubectl kustomize` when it is installed, else with a
small resolver covering the features deploy/k8s uses.

Resolver scope (anything else in a kustomization fails loudly, so a new feature cannot
slip past the tests): `resources` (files and directories), `namespace`, `images`,
`replicas`, `patches` given as a strategic-merge file (`path`) or as an inline
JSON 6902 list with a `target`, and `replacements` (inline or a `path`; dotted field
paths with numeric list indices; the `delimiter`/`index` option). Strategic merge here
merges maps, merges lists of maps by their `name`, and replaces other lists: what
Kubernetes does for the fields patched.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

Doc = dict[str, Any]

SUPPORTED = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "images",
    "replicas",
    "patches",
    "replacements",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


class KustomizeError(Exception):
    """The kustomization uses something this resolver does not implement."""


def load_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kubectl_build(directory: Path) -> list[Doc] | None:
    """The overlay as kubectl's embedded kustomize renders it; None without kubectl."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)], check=True, capture_output=True, text=True
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def build(directory: Path) -> list[Doc]:
    """Resolve `directory`/kustomization.yaml into the list of objects it produces."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{directory}: unsupported fields {sorted(unknown)}")

    docs: list[Doc] = []
    for entry in kustomization.get("resources", []):
        target = directory / entry
        docs.extend(build(target) if target.is_dir() else load_docs(target))

    for patch in kustomization.get("patches", []):
        if "path" in patch:
            for change in load_docs(directory / patch["path"]):
                obj = _find(docs, change["kind"], change["metadata"]["name"])
                _strategic_merge(obj, change)
        elif "patch" in patch and "target" in patch:
            obj = _find(docs, patch["target"]["kind"], patch["target"]["name"])
            for op in yaml.safe_load(patch["patch"]):
                _json6902(obj, op)
        else:
            raise KustomizeError(f"{directory}: unsupported patch {patch}")

    for rule in kustomization.get("replicas", []):
        _find(docs, "Deployment", rule["name"])["spec"]["replicas"] = rule["count"]

    for image in kustomization.get("images", []):
        for doc in docs:
            for container in _containers(doc):
                name, _, _tag = container["image"].partition(":")
                if name == image["name"]:
                    new_name = image.get("newName", name)
                    container["image"] = f"{new_name}:{image['newTag']}"

    # kustomize runs replacements after every transformer of the same kustomization.
    for entry in kustomization.get("replacements", []):
        rules = load_docs(directory / entry["path"]) if "path" in entry else [entry]
        for rule in rules:
            _replace(docs, rule)

    if "namespace" in kustomization:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = kustomization["namespace"]
    return docs


def _find(docs: list[Doc], kind: str, name: str) -> Doc:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise KustomizeError(f"patch target {kind}/{name} not found")


def _containers(doc: Doc) -> list[Doc]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("containers", []), *spec.get("initContainers", [])]


def _strategic_merge(base: Doc, change: Doc) -> None:
    for key, value in change.items():
        current = base.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            _strategic_merge(current, value)
        elif (
            isinstance(value, list)
            and isinstance(current, list)
            and all(isinstance(v, dict) and "name" in v for v in [*value, *current])
        ):
            by_name = {item["name"]: item for item in current}
            for item in value:
                if item["name"] in by_name:
                    _strategic_merge(by_name[item["name"]], item)
                else:
                    current.append(copy.deepcopy(item))
        else:
            base[key] = copy.deepcopy(value)


def _json6902(doc: Doc, op: Doc) -> None:
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key: Any = int(last) if isinstance(node, list) and last != "-" else last
    if op["op"] == "replace":
        node[key] = op["value"]
    elif op["op"] == "add":
        if isinstance(node, list):
            node.append(op["value"]) if key == "-" else node.insert(key, op["value"])
        else:
            node[key] = op["value"]
    elif op["op"] == "remove":
        del node[key]
    else:
        raise KustomizeError(f"unsupported JSON patch op {op['op']}")


def _path(field_path: str) -> list[str]:
    return field_path.split(".")


def _get(node: Any, field_path: str) -> Any:
    for part in _path(field_path):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _replace(docs: list[Doc], rule: Doc) -> None:
    source = rule["source"]
    value = _get(_find(docs, source["kind"], source["name"]), source["fieldPath"])
    for target in rule["targets"]:
        select = target["select"]
        chosen = [
            d
            for d in docs
            if d["kind"] == select["kind"]
            and select.get("name", d["metadata"]["name"]) == d["metadata"]["name"]
        ]
        if not chosen:
            raise KustomizeError(f"replacement target {select} not found")
        options = target.get("options", {})
        for doc in chosen:
            for field_path in target["fieldPaths"]:
                *parents, last = _path(field_path)
                node: Any = doc
                for part in parents:
                    node = node[int(part)] if isinstance(node, list) else node[part]
                key: Any = int(last) if isinstance(node, list) else last
                new = value
                if "delimiter" in options:
                    pieces = str(node[key]).split(options["delimiter"])
                    pieces[int(options.get("index", 0))] = str(value)
                    new = options["delimiter"].join(pieces)
                node[key] = new
