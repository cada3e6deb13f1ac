"""`keyveil env`: check, generate, seal and grade a keyveil environment.

    validate   every variable checked by the services' own settings models plus the
               cross-service rules; names variables, never values; exit 0 or 1
    template   a .env with fresh secrets (mode 0600; --force to overwrite)
    encrypt    NAME < plaintext  ->  enc:v1:... (services open it at start-up)
    decrypt    NAME enc:v1:...   ->  plaintext
    posture    what is strong, weak or missing, and a score (text or --json)
    reference  the configuration reference (docs/configuration.md), from the models

Without --env-file the process environment is checked; with it, only the file.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from keyveil.configref import REFERENCE_PATH, REGENERATE, render_reference, settings_model
from services.auditor.ledgerkeys import LedgerSigner
from shared.errors import ConfigError
from shared.sealedconfig import (
    SealedConfigError,
    decrypt_value,
    encrypt_value,
    is_sealed,
    open_environment,
)
from shared.settings import (
    Environment,
    check_secret_strength,
    env_name,
    parse_environment,
    public_url_problem,
)

__all__ = ["SERVICES", "Check", "parse_env_file", "posture", "register", "validate"]

SERVICES = ("token", "proxy", "keymanager", "auditor")
SECRETS = ("KEY_ENCRYPTION_SECRET", "PROXY_SIGNING_KEY")

Status = Literal["strong", "weak", "missing"]


# --- reading an environment ---------------------------------------------------------


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a .env file (comments, blank lines and `export ` ignored)."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").lstrip()
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise SystemExit(f"keyveil env: {path}:{number} is not NAME=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name] = value
    return values


def _environment(args: argparse.Namespace) -> dict[str, str]:
    if getattr(args, "env_file", None):
        return parse_env_file(Path(args.env_file))
    return dict(os.environ)


# --- validate -----------------------------------------------------------------------


def _isolated(model: type[BaseSettings]) -> type[BaseSettings]:
    """`model` reading only its constructor arguments (not the process environment)."""

    def sources(
        cls: type[BaseSettings],
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)

    namespace = {"settings_customise_sources": classmethod(sources)}
    return type(f"Isolated{model.__name__}", (model,), namespace)


def _service_problems(model: type[BaseSettings], env: Mapping[str, str]) -> list[tuple[str, str]]:
    values: dict[str, Any] = dict(env)
    try:
        _isolated(model)(**values)
    except ConfigError as exc:
        return list(exc.problems)
    except ValidationError as exc:
        problems: list[tuple[str, str]] = []
        for error in exc.errors(include_input=False, include_url=False):
            rule = error["msg"].removeprefix("Value error, ")
            if error["loc"]:
                problems.append((env_name(model, str(error["loc"][0])), rule))
            else:
                problems.append(_named_in(rule))
        return problems
    return []


def _named_in(rule: str) -> tuple[str, str]:
    """A model-level rule ("NAME must ...") as (NAME, "must ...")."""
    first, _, rest = rule.partition(" ")
    if first.isupper() and first.replace("_", "").isalnum() and rest:
        return first, rest
    return "(settings)", rule


def _is_production(env: Mapping[str, str]) -> bool:
    return parse_environment(env.get("NODE_ENV") or env.get("APP_ENV") or "") is (
        Environment.production
    )


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _origins(env: Mapping[str, str]) -> list[str]:
    return [o.strip() for o in env.get("ALLOWED_ORIGINS", "").split(",") if o.strip()]


def _common_problems(env: Mapping[str, str]) -> list[tuple[str, str]]:
    """Rules across services that no single settings model can see (the models check
    everything else, NODE_ENV and LOG_LEVEL included)."""
    problems: list[tuple[str, str]] = []
    present = {name: env[name] for name in SECRETS if env.get(name)}
    if len(present) == len(SECRETS) and len(set(present.values())) == 1:
        problems.append(("PROXY_SIGNING_KEY", "must differ from KEY_ENCRYPTION_SECRET"))
    weak_nats = bool(env.get("NATS_PASSWORD")) and check_secret_strength(env["NATS_PASSWORD"])
    if _is_production(env) and weak_nats:
        problems.append(("NATS_PASSWORD", "must be a strong secret in production"))
    return problems


@dataclass(frozen=True)
class ValidationReport:
    problems: dict[str, list[str]]  # "VARIABLE: rule" -> services (or "all")
    checked: list[str]
    skipped: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def validate(env: Mapping[str, str], services: tuple[str, ...] = SERVICES) -> ValidationReport:
    """Check `env` as each service would at start-up, plus the cross-service rules."""
    problems: dict[str, list[str]] = {}

    def add(pairs: list[tuple[str, str]], where: str) -> None:
        for name, rule in pairs:
            problems.setdefault(f"{name}: {rule}", []).append(where)

    try:
        opened = {**env, **open_environment(env)}
    except ConfigError as exc:
        add(list(exc.problems), "all")
        opened = {k: v for k, v in env.items() if not is_sealed(v)}
    add(_common_problems(opened), "all")
    checked, skipped = [], []
    for service in services:
        model = settings_model(service)
        if model is None:
            skipped.append(service)
            continue
        checked.append(service)
        add(_service_problems(model, opened), service)
    return ValidationReport(problems, checked, skipped)


def _validate(args: argparse.Namespace) -> int:
    services = tuple(args.service) if args.service else SERVICES
    report = validate(_environment(args), services)
    if args.json:
        print(json.dumps(asdict(report) | {"ok": report.ok}, indent=2))
        return 0 if report.ok else 1
    for problem, where in sorted(report.problems.items()):
        print(f"ERROR {problem} [{', '.join(sorted(set(where)))}]")
    for service in report.skipped:
        print(f"note: {service} settings are not available; not checked")
    verdict = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    print(f"keyveil env validate: {verdict} ({', '.join(report.checked) or 'no services'})")
    return 0 if report.ok else 1


# --- template -----------------------------------------------------------------------


def render_template(*, production: bool) -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    origins = "https://app.example.org" if production else "http://localhost:3000"
    ledger_signer = LedgerSigner.generate()
    lines = [
        f"# keyveil environment, generated by `keyveil env template` on {stamp}.",
        "# Secrets below are fresh (secrets.token_urlsafe). Keep this file private (0600);",
        "# put values in a secret store, or seal them with `keyveil env encrypt NAME`.",
        f"NODE_ENV={'production' if production else 'development'}",
        "",
        "# key-manager only: the KEK source, and the provider key to import at first start.",
        f"KEY_ENCRYPTION_SECRET={secrets.token_urlsafe(48)}",
        "# OPENAI_API_KEY=",
        "",
        "# token + proxy: signs proxy tokens and derives per-token request-signing keys.",
        f"PROXY_SIGNING_KEY={secrets.token_urlsafe(48)}",
        "",
        "# auditor only: signs the audit ledger and its checkpoints (no NATS login holds it).",
        "# LEDGER_VERIFY_KEY is its public half: give it to whoever runs `keyveil audit verify`.",
        f"LEDGER_SIGNING_KEY={ledger_signer.seed_b64()}",
        f"LEDGER_VERIFY_KEY={ledger_signer.public_key_b64}",
        "LEDGER_CHECKPOINT_DIR="
        + ("/var/lib/keyveil/ledger-checkpoints" if production else ".keyveil/ledger/checkpoints"),
        "",
        "# The bus and shared state. Each service has its own NATS_USER / NATS_PASSWORD.",
        "NATS_URL=" + ("tls://nats:4222" if production else "nats://127.0.0.1:4222"),
        "REDIS_URL=" + ("rediss://redis:6379/0" if production else "redis://127.0.0.1:6379/0"),
        "",
        "# Who may get tokens: oidc (the app's login, verified against its JWKS), assertion",
        "# (the app's backend signs a short JWT), or anonymous (production: opt-in only).",
        *(
            [
                "KEYVEIL_AUTH_MODE=oidc",
                "OIDC_ISSUER=https://login.example.org",
                "OIDC_AUDIENCE=keyveil-app",
            ]
            if production
            else ["KEYVEIL_AUTH_MODE=anonymous"]
        ),
        "# KEYVEIL_POLICY_FILE=/etc/keyveil/policy.toml  (models and caps; README)",
        "",
        "# Limits and lifetimes.",
        "VOICE_AGENT_RATE_LIMIT=10",
        "VOICE_AGENT_PROXY_RATE_LIMIT=120",
        "VOICE_AGENT_TOKEN_DURATION=300",
        "",
        "# Browser origins allowed to get tokens and call the proxy"
        + (" (replace with yours)." if production else "."),
        f"ALLOWED_ORIGINS={origins}",
        "# What issued tokens tell browsers to call: the ingress host + the proxy path.",
        "PROXY_PUBLIC_URL="
        + (
            "https://keyveil.example.org/api/voice-agent/proxy/v1"
            if production
            else "http://127.0.0.1:8081/api/voice-agent/proxy/v1"
        ),
        "VOICE_AGENT_DEMO_MODE=false",
        "OPENAI_BASE_URL=https://api.openai.com/v1",
        "# CIDRs of the ingress proxies whose X-Forwarded-For is believed.",
        "TRUSTED_PROXIES=",
        "",
    ]
    return "\n".join(lines)


def _template(args: argparse.Namespace) -> int:
    path = Path(args.output)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if args.force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        print(f"keyveil env template: {path} exists; use --force to overwrite", file=sys.stderr)
        return 1
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(render_template(production=args.production))
    os.chmod(path, 0o600)  # O_TRUNC keeps an existing file's mode
    print(f"keyveil env template: wrote {path} (mode 0600) with fresh secrets")
    return 0


# --- encrypt / decrypt ----------------------------------------------------------------


def _sealing_secrets(env: Mapping[str, str]) -> list[str]:
    return [env.get("KEY_ENCRYPTION_SECRET", ""), env.get("KEY_ENCRYPTION_SECRET_PREVIOUS", "")]


def _read_value(given: str | None) -> str:
    value = given if given is not None else sys.stdin.read()
    return value.rstrip("\r\n")


def _encrypt(args: argparse.Namespace) -> int:
    env = _environment(args)
    secret = env.get("KEY_ENCRYPTION_SECRET", "")
    if not secret:
        print("keyveil env encrypt: KEY_ENCRYPTION_SECRET is not set", file=sys.stderr)
        return 1
    if (rule := check_secret_strength(secret)) is not None:
        print(f"keyveil env encrypt: KEY_ENCRYPTION_SECRET {rule}", file=sys.stderr)
        return 1
    if args.name in ("KEY_ENCRYPTION_SECRET", "KEY_ENCRYPTION_SECRET_PREVIOUS"):
        print(f"keyveil env encrypt: {args.name} cannot seal itself", file=sys.stderr)
        return 1
    plaintext = _read_value(None)
    if not plaintext:
        print("keyveil env encrypt: no value on standard input", file=sys.stderr)
        return 1
    print(encrypt_value(args.name, plaintext, secret=secret))
    return 0


def _decrypt(args: argparse.Namespace) -> int:
    env = _environment(args)
    try:
        print(decrypt_value(args.name, _read_value(args.value), secrets=_sealing_secrets(env)))
    except SealedConfigError as exc:
        print(f"keyveil env decrypt: {exc}", file=sys.stderr)
        return 1
    return 0


# --- posture ------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    variable: str
    status: Status
    weight: int
    detail: str

    @property
    def points(self) -> float:
        return {"strong": 1.0, "weak": 0.5, "missing": 0.0}[self.status] * self.weight


def _secret_check(env: Mapping[str, str], name: str, weight: int) -> Check:
    value = env.get(name, "")
    if not value:
        return Check(f"{name} set", name, "missing", weight, "not set")
    if is_sealed(value):
        return Check(f"{name} strength", name, "strong", weight, "sealed (enc:v1:)")
    rule = check_secret_strength(value)
    if rule is not None:
        return Check(f"{name} strength", name, "weak", weight, rule)
    return Check(f"{name} strength", name, "strong", weight, "32+ characters, high entropy")


def _origins_check(env: Mapping[str, str]) -> Check:
    origins = _origins(env)
    if not origins:
        return Check("browser origins", "ALLOWED_ORIGINS", "missing", 10, "not set")
    if "*" in origins:
        return Check("browser origins", "ALLOWED_ORIGINS", "weak", 10, "allows any origin (*)")
    plain = [o for o in origins if not o.startswith("https://")]
    if plain:
        return Check("browser origins", "ALLOWED_ORIGINS", "weak", 10, f"{len(plain)} not https")
    return Check("browser origins", "ALLOWED_ORIGINS", "strong", 10, "https only")


def _nats_checks(env: Mapping[str, str]) -> list[Check]:
    url = env.get("NATS_URL", "")
    password = env.get("NATS_PASSWORD", "")
    if not env.get("NATS_USER") or not password:
        auth = Check("bus authentication", "NATS_PASSWORD", "missing", 10, "no NATS user")
    elif check_secret_strength(password) and not is_sealed(password):
        auth = Check("bus authentication", "NATS_PASSWORD", "weak", 10, "weak NATS password")
    else:
        auth = Check("bus authentication", "NATS_PASSWORD", "strong", 10, "per-service user")
    tls = url.startswith("tls://")
    detail = "tls://" if tls else "plaintext connection"
    return [auth, Check("bus encryption", "NATS_URL", "strong" if tls else "weak", 5, detail)]


def _redis_check(env: Mapping[str, str]) -> Check:
    url = env.get("REDIS_URL", "")
    tls = url.startswith("rediss://")
    auth = "@" in url.split("//", 1)[-1].split("/", 1)[0]
    if tls and auth:
        return Check("shared state", "REDIS_URL", "strong", 5, "TLS and a password")
    if tls or auth:
        return Check("shared state", "REDIS_URL", "weak", 5, "TLS only" if tls else "password only")
    return Check("shared state", "REDIS_URL", "missing", 5, "no TLS, no password")


def _number(env: Mapping[str, str], name: str, default: int) -> int | None:
    try:
        return int(env.get(name, str(default)))
    except ValueError:
        return None


def _token_default(field: str) -> int:
    """A token-service default, read from its settings model (not restated here)."""
    model = settings_model("token")
    default = model.model_fields[field].default if model is not None else None
    return int(default) if isinstance(default, int) else 0


def _limits_checks(env: Mapping[str, str]) -> list[Check]:
    duration = _number(env, "VOICE_AGENT_TOKEN_DURATION", _token_default("token_duration_s"))
    rate = _number(env, "VOICE_AGENT_RATE_LIMIT", _token_default("rate_limit_per_minute"))
    name = "token lifetime"
    if duration is None:
        life = Check(name, "VOICE_AGENT_TOKEN_DURATION", "missing", 5, "not a number")
    elif duration <= 600:
        life = Check(name, "VOICE_AGENT_TOKEN_DURATION", "strong", 5, f"{duration}s")
    else:
        life = Check(name, "VOICE_AGENT_TOKEN_DURATION", "weak", 5, f"{duration}s is long")
    if rate is None:
        limit = Check("issuance limit", "VOICE_AGENT_RATE_LIMIT", "missing", 5, "not a number")
    elif rate <= 60:
        limit = Check("issuance limit", "VOICE_AGENT_RATE_LIMIT", "strong", 5, f"{rate}/min")
    else:
        limit = Check("issuance limit", "VOICE_AGENT_RATE_LIMIT", "weak", 5, f"{rate}/min")
    return [life, limit]


def _caller_auth_check(env: Mapping[str, str]) -> Check:
    """Who may get tokens: anonymous issuance is an open faucet on the provider bill."""
    mode = (env.get("KEYVEIL_AUTH_MODE") or "anonymous").strip().lower()
    name, variable = "caller authentication", "KEYVEIL_AUTH_MODE"
    if mode == "oidc":
        issuer = env.get("OIDC_ISSUER", "")
        if not issuer.startswith("https://") or not env.get("OIDC_AUDIENCE"):
            return Check(name, "OIDC_ISSUER", "weak", 10, "oidc without an https issuer/audience")
        return Check(name, variable, "strong", 10, "the app's OIDC login")
    if mode == "assertion":
        return Check(name, variable, "strong", 10, "assertions signed by the app's backend")
    if mode == "anonymous":
        return Check(name, variable, "weak", 10, "anonymous: anyone with an allowed Origin")
    return Check(name, variable, "missing", 10, "not one of oidc, assertion, anonymous")


def _trusted_proxies_check(env: Mapping[str, str]) -> Check:
    entries = [e.strip() for e in env.get("TRUSTED_PROXIES", "").split(",") if e.strip()]
    for entry in entries:
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            return Check("forwarded-for trust", "TRUSTED_PROXIES", "weak", 5, "unparseable CIDR")
        if network.prefixlen == 0:
            return Check("forwarded-for trust", "TRUSTED_PROXIES", "weak", 5, "trusts everyone")
    detail = f"{len(entries)} network(s)" if entries else "no proxies trusted"
    return Check("forwarded-for trust", "TRUSTED_PROXIES", "strong", 5, detail)


_REMOTE_KEKS = ("vault-transit", "aws-kms")


def _kek_custody_check(env: Mapping[str, str]) -> Check:
    """Where the key-encryption key lives: a KMS or Vault in production, not an env var."""
    provider = (env.get("KEK_PROVIDER") or "local").strip().lower()
    node_env = (env.get("NODE_ENV") or env.get("APP_ENV") or "development").lower()
    production = node_env in ("production", "prod", "staging")
    name, variable, weight = "KEK custody", "KEK_PROVIDER", 10
    if provider == "local":
        if production:
            return Check(
                name,
                variable,
                "weak",
                weight,
                "local KEK from KEY_ENCRYPTION_SECRET in production: set KEK_PROVIDER="
                "vault-transit (VAULT_ADDR, VAULT_TRANSIT_KEY, VAULT_K8S_ROLE) or aws-kms "
                "(KMS_KEY_ID, IRSA) so the master key never sits in a Secret",
            )
        return Check(name, variable, "strong", weight, "local KEK (development)")
    if provider == "vault-transit":
        absent = [v for v in ("VAULT_ADDR", "VAULT_TRANSIT_KEY") if not env.get(v)]
        if absent:
            return Check(name, absent[0], "missing", weight, f"{', '.join(absent)} not set")
        if production and not env.get("VAULT_ADDR", "").startswith("https://"):
            return Check(name, "VAULT_ADDR", "weak", weight, "Vault reached without TLS")
        if (
            production
            and env.get("VAULT_TOKEN")
            and not (env.get("VAULT_K8S_ROLE") or env.get("VAULT_ROLE_ID"))
        ):
            return Check(
                name,
                "VAULT_TOKEN",
                "weak",
                weight,
                "a static Vault token: use Kubernetes auth (VAULT_K8S_ROLE) or AppRole",
            )
        return Check(name, variable, "strong", weight, "Vault/OpenBao transit")
    if provider == "aws-kms":
        if not env.get("KMS_KEY_ID"):
            return Check(name, "KMS_KEY_ID", "missing", weight, "KMS_KEY_ID not set")
        if production and env.get("AWS_SECRET_ACCESS_KEY"):
            return Check(
                name,
                "AWS_SECRET_ACCESS_KEY",
                "weak",
                weight,
                "static AWS keys: use IRSA (a service-account role) instead",
            )
        return Check(name, variable, "strong", weight, "AWS KMS")
    return Check(name, variable, "missing", weight, f"unknown provider {provider!r}")


def _environment_check(env: Mapping[str, str]) -> Check:
    raw = env.get("NODE_ENV") or env.get("APP_ENV") or "development"
    parsed = parse_environment(raw)
    if parsed is None:  # the services refuse to start with it
        known = ", ".join(e.value for e in Environment)
        return Check("environment", "NODE_ENV", "missing", 5, f"not one of {known}")
    status: Status = "weak" if parsed is Environment.development else "strong"
    return Check("environment", "NODE_ENV", status, 5, parsed.value)


def _public_url_check(env: Mapping[str, str]) -> Check:
    """What issued tokens tell browsers to call: loopback or http cannot serve real users."""
    name = "public proxy URL"
    url = env.get("PROXY_PUBLIC_URL", "")
    if not url:
        return Check(name, "PROXY_PUBLIC_URL", "missing", 5, "not set (tokens name 127.0.0.1)")
    rule = public_url_problem(url)
    if rule is not None:
        return Check(name, "PROXY_PUBLIC_URL", "weak", 5, rule.removesuffix(" in production"))
    return Check(name, "PROXY_PUBLIC_URL", "strong", 5, "https, public host")


def posture(env: Mapping[str, str]) -> list[Check]:
    """Every posture check, graded strong / weak / missing."""
    checks = [_secret_check(env, name, 20) for name in SECRETS]
    remote_kek = (env.get("KEK_PROVIDER") or "").strip().lower() in _REMOTE_KEKS
    if remote_kek and not env.get(SECRETS[0]) and env.get("KEK_PREVIOUS_PROVIDER") != "local":
        checks[0] = Check(
            "KEY_ENCRYPTION_SECRET set", SECRETS[0], "strong", 20, "not needed: the KEK is remote"
        )
    checks.append(_kek_custody_check(env))
    kek, psk = env.get(SECRETS[0]), env.get(SECRETS[1])
    if kek and psk:
        same = kek == psk
        checks.append(
            Check(
                "separate secrets",
                "PROXY_SIGNING_KEY",
                "weak" if same else "strong",
                5,
                "same value as KEY_ENCRYPTION_SECRET" if same else "distinct",
            )
        )
    elif remote_kek and psk and not kek:
        checks.append(Check("separate secrets", "PROXY_SIGNING_KEY", "strong", 5, "no KEK secret"))
    else:
        checks.append(Check("separate secrets", "PROXY_SIGNING_KEY", "missing", 5, "not both set"))
    checks.append(_origins_check(env))
    demo = _truthy(env.get("VOICE_AGENT_DEMO_MODE"))
    checks.append(
        Check(
            "demo mode",
            "VOICE_AGENT_DEMO_MODE",
            "weak" if demo else "strong",
            5,
            "on" if demo else "off",
        )
    )
    checks.append(_environment_check(env))
    checks.append(_public_url_check(env))
    checks.extend(_nats_checks(env))
    checks.append(_redis_check(env))
    checks.extend(_limits_checks(env))
    base_url = env.get("OPENAI_BASE_URL", "https://api.openai.com/v1")
    https = base_url.startswith("https://")
    checks.append(
        Check(
            "upstream TLS",
            "OPENAI_BASE_URL",
            "strong" if https else "weak",
            5,
            "https" if https else "http",
        )
    )
    in_env = bool(env.get("OPENAI_API_KEY"))
    checks.append(
        Check(
            "provider key placement",
            "OPENAI_API_KEY",
            "weak" if in_env else "strong",
            5,
            "present here: give it to the key-manager only"
            if in_env
            else "not in this environment",
        )
    )
    checks.append(_trusted_proxies_check(env))
    checks.append(_caller_auth_check(env))
    return checks


def score(checks: list[Check]) -> int:
    total = sum(c.weight for c in checks)
    return round(100 * sum(c.points for c in checks) / total) if total else 0


def _posture(args: argparse.Namespace) -> int:
    env = _environment(args)
    checks = posture(env)
    result = score(checks)
    if args.json:
        grouped: dict[str, list[str]] = {"strong": [], "weak": [], "missing": []}
        for check in checks:
            grouped[check.status].append(check.variable)
        print(
            json.dumps(
                {"score": result, **grouped, "checks": [asdict(c) for c in checks]}, indent=2
            )
        )
    else:
        print(f"keyveil security posture: {result}/100")
        for check in sorted(checks, key=lambda c: ("missing", "weak", "strong").index(c.status)):
            print(f"  {check.status:<8} {check.variable:<28} {check.name}: {check.detail}")
    if args.min_score is not None and result < args.min_score:
        return 1
    return 0


# --- reference ----------------------------------------------------------------------


def _reference(args: argparse.Namespace) -> int:
    text = render_reference()
    if args.check:
        path = Path(args.output or REFERENCE_PATH)
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != text:
            print(f"keyveil env reference: {path} is stale; run `{REGENERATE}`", file=sys.stderr)
            return 1
        print(f"keyveil env reference: {path} is current")
        return 0
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"keyveil env reference: wrote {args.output}")
    else:
        print(text, end="")
    return 0


# --- wiring -------------------------------------------------------------------------


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "env", help="validate, generate, seal and grade the environment"
    )
    actions = parser.add_subparsers(dest="env_command", required=True, metavar="ACTION")

    def action(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> Any:
        child = actions.add_parser(name, help=help)
        child.set_defaults(handler=handler)
        return child

    def env_file(child: argparse.ArgumentParser) -> None:
        child.add_argument(
            "--env-file", metavar="PATH", help="check this .env file instead of the environment"
        )

    check = action("validate", _validate, "check every variable; exit 1 on any problem")
    env_file(check)
    check.add_argument("--service", action="append", choices=SERVICES, help="only these")
    check.add_argument("--json", action="store_true")

    template = action("template", _template, "write a .env with fresh secrets (mode 0600)")
    template.add_argument("--output", "-o", default=".env", metavar="PATH")
    template.add_argument("--force", action="store_true", help="overwrite an existing file")
    template.add_argument("--production", action="store_true", help="production-shaped values")

    encrypt = action("encrypt", _encrypt, "seal the value on stdin for variable NAME")
    encrypt.add_argument("name", metavar="NAME")
    env_file(encrypt)

    decrypt = action("decrypt", _decrypt, "open an enc:v1: value of variable NAME")
    decrypt.add_argument("name", metavar="NAME")
    decrypt.add_argument("value", nargs="?", help="the enc:v1: value (default: stdin)")
    env_file(decrypt)

    grade = action("posture", _posture, "security posture report and score")
    env_file(grade)
    grade.add_argument("--json", action="store_true")
    grade.add_argument("--min-score", type=int, metavar="N", help="exit 1 below this score")

    reference = action("reference", _reference, "the configuration reference, as Markdown")
    reference.add_argument(
        "--output", "-o", metavar="PATH", help=f"write it (e.g. {REFERENCE_PATH})"
    )
    reference.add_argument(
        "--check", action="store_true", help="exit 1 when the file differs from the models"
    )
