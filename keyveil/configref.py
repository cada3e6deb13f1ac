"""The configuration reference, generated from the services' settings models.

Every variable comes from a field: its name from the alias, the type, default and
constraints from the field, the text from the field's docstring. `keyveil env reference
-o docs/configuration.md` writes it; a test fails when the file differs or a field has
no docstring.
"""

from __future__ import annotations

import enum
import importlib
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import AliasChoices, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings, NoDecode

__all__ = [
    "SERVICES",
    "Variable",
    "render_reference",
    "settings_model",
    "undocumented",
    "variables",
]

SERVICES = ("token", "proxy", "keymanager", "auditor")
REFERENCE_PATH = "docs/configuration.md"
REGENERATE = "make config-docs"

# Read outside the settings models (by libraries or by `keyveil up`), so listed here.
OTHER_VARIABLES: tuple[tuple[str, str, str], ...] = (
    ("OTEL_TRACES_EXPORTER", "all", "Tracing exporter: none (default), otlp or console."),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "all", "OTLP collector endpoint when exporting traces."),
    ("OTEL_SERVICE_NAME", "all", "Service name on traces (default keyveil-<service>)."),
    (
        "PROMETHEUS_MULTIPROC_DIR",
        "all",
        "Directory for prometheus_client's multi-process metrics (several workers).",
    ),
    (
        "KEYVEIL_BOOTSTRAP_NATS_USER",
        "keyveil up",
        "NATS user `keyveil up` creates the streams with on a given NATS_URL.",
    ),
    (
        "KEYVEIL_BOOTSTRAP_NATS_PASSWORD",
        "keyveil up",
        "Password of KEYVEIL_BOOTSTRAP_NATS_USER.",
    ),
)


@dataclass(frozen=True)
class Variable:
    """One environment variable as one service's settings read it."""

    name: str
    aliases: tuple[str, ...]
    type: str
    default: str
    rule: str
    description: str
    secret: bool


def settings_model(service: str) -> type[BaseSettings] | None:
    """`services.<service>.settings.Settings`, or None when that service is not installed."""
    try:
        module = importlib.import_module(f"services.{service}.settings")
    except ImportError:
        return None
    model = getattr(module, "Settings", None)
    return model if isinstance(model, type) and issubclass(model, BaseSettings) else None


def _names(name: str, info: FieldInfo) -> tuple[str, ...]:
    alias = info.validation_alias
    if isinstance(alias, str):
        return (alias,)
    if isinstance(alias, AliasChoices):
        return tuple(c for c in alias.choices if isinstance(c, str)) or (name.upper(),)
    return (info.alias or name.upper(),)


def _type_name(annotation: Any, metadata: Iterable[Any]) -> str:
    if any(m is NoDecode or isinstance(m, type(NoDecode)) for m in metadata):
        return "comma list"
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        args = typing.get_args(annotation)
        return _type_name(args[0], args[1:])
    if origin in (typing.Union, types.UnionType):
        parts = [a for a in typing.get_args(annotation) if a is not type(None)]
        return " | ".join(_type_name(a, metadata) for a in parts)
    if origin is list:
        return "comma list"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in annotation)
    if annotation is SecretStr:
        return "secret"
    return getattr(annotation, "__name__", str(annotation))


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        factory = typing.cast(Callable[[], Any], info.default_factory)
        value = factory()
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if value is None:
        return "unset"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "empty"
    return str(value)


_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


def _rule(info: FieldInfo) -> str:
    parts: list[str] = []
    for item in info.metadata:
        for attribute, symbol in _BOUNDS:
            bound = getattr(item, attribute, None)
            if bound is not None:
                parts.append(
                    f"{symbol} {bound:g}" if isinstance(bound, float) else f"{symbol} {bound}"
                )
        pattern = getattr(item, "pattern", None)
        if pattern:
            parts.append(f"matches `{pattern}`")
        for attribute, label in (("min_length", "length ≥"), ("max_length", "length ≤")):
            size = getattr(item, attribute, None)
            if size is not None:
                parts.append(f"{label} {size}")
    return ", ".join(parts)


def _description(info: FieldInfo) -> str:
    return re.sub(r"\s+", " ", info.description or "").strip()


def variables(model: type[BaseSettings]) -> list[Variable]:
    """Every variable `model` reads, in field order."""
    found: list[Variable] = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        aliases = _names(name, info)
        found.append(
            Variable(
                name=aliases[0],
                aliases=aliases[1:],
                type=_type_name(annotation, info.metadata),
                default=_default(info),
                rule=_rule(info),
                description=_description(info),
                secret=_type_name(annotation, info.metadata).startswith("secret"),
            )
        )
    return found


def undocumented(models: dict[str, type[BaseSettings]] | None = None) -> list[str]:
    """`service: VARIABLE` for every field without a docstring/description."""
    models = models if models is not None else _installed()
    return [
        f"{service}: {v.name}"
        for service, model in models.items()
        for v in variables(model)
        if not v.description
    ]


def _installed() -> dict[str, type[BaseSettings]]:
    found: dict[str, type[BaseSettings]] = {}
    for service in SERVICES:
        model = settings_model(service)
        if model is not None:
            found[service] = model
    return found


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "-"


def render_reference(models: dict[str, type[BaseSettings]] | None = None) -> str:
    """docs/configuration.md: one table per group of services reading the same variables."""
    models = models if models is not None else _installed()
    by_name: dict[str, dict[str, Variable]] = {}
    for service, model in models.items():
        for variable in variables(model):
            by_name.setdefault(variable.name, {})[service] = variable
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, per_service in by_name.items():
        readers = tuple(s for s in models if s in per_service)
        groups.setdefault(readers, []).append(name)

    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from the settings models by `keyveil env reference`; do not edit.",
        f"     Regenerate with `{REGENERATE}`; tests/operator/test_configuration.py",
        "     fails when this file is stale or a settings field has no docstring. -->",
        "",
        "Every service reads its configuration from the environment once, at start-up, and",
        "refuses to start (exit code 2) naming each variable that breaks a rule, never its",
        "value. `keyveil env validate` applies the same models to an environment or a",
        "`.env` file; `keyveil env posture` grades it. Values may be sealed with",
        "`keyveil env encrypt NAME` (`enc:v1:...`).",
        "",
        "Types: *comma list* is a comma-separated string; *secret* never appears in logs,",
        "errors or `/metrics`. Rules checked by validators (production rules, secret",
        "strength) are in the description.",
        "",
    ]
    order = sorted(
        groups, key=lambda readers: (-len(readers), [SERVICES.index(s) for s in readers])
    )
    for readers in order:
        title = "Every service" if len(readers) == len(models) else ", ".join(readers)
        lines += [f"## {title}", ""]
        lines += ["| variable | type | default | rule | description |", "|---|---|---|---|---|"]
        for name in groups[readers]:
            per_service = by_name[name]
            first = per_service[readers[0]]
            defaults = {s: v.default for s, v in per_service.items()}
            if len(set(defaults.values())) == 1:
                default = f"`{first.default}`"
            else:
                default = "; ".join(f"{s}: `{d}`" for s, d in defaults.items())
            rules = {v.rule for v in per_service.values()}
            rule = (
                first.rule
                if len(rules) == 1
                else "; ".join(f"{s}: {v.rule or '-'}" for s, v in per_service.items())
            )
            texts = {v.description or "**undocumented**" for v in per_service.values()}
            description = (
                texts.pop()
                if len(texts) == 1
                else "; ".join(
                    f"{s}: {v.description or '**undocumented**'}" for s, v in per_service.items()
                )
            )
            shown = f"`{name}`" + "".join(f" (alias `{a}`)" for a in first.aliases)
            lines.append(
                f"| {shown} | {_cell(first.type)} | {_cell(default)} | {_cell(rule)} "
                f"| {_cell(description)} |"
            )
        lines.append("")
    lines += [
        "## Read outside the settings models",
        "",
        "| variable | read by | description |",
        "|---|---|---|",
    ]
    lines += [f"| `{n}` | {who} | {_cell(text)} |" for n, who, text in OTHER_VARIABLES]
    lines.append("")
    return "\n".join(lines)
