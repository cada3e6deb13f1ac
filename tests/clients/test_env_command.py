"""`keyveil env`: validate, template, encrypt, decrypt and posture, good and bad inputs."""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path

import pytest

from keyveil.cli import main
from keyveil.commands.env import parse_env_file
from services.auditor.ledgerkeys import LedgerSigner
from shared.sealedconfig import encrypt_value
from tests.support import TEST_KEY_ENCRYPTION_SECRET, TEST_PROXY_SIGNING_KEY

WEAK = "weak-but-long-secret-aaaaaaaaaaaaaaaaaaaaaa"
LEDGER_SEED = LedgerSigner.generate().seed_b64()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["env", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def write_env(path: Path, **values: str) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def good_env(**overrides: str) -> dict[str, str]:
    values = {
        "NODE_ENV": "production",
        "KEY_ENCRYPTION_SECRET": TEST_KEY_ENCRYPTION_SECRET,
        "PROXY_SIGNING_KEY": TEST_PROXY_SIGNING_KEY,
        "ALLOWED_ORIGINS": "https://app.keyveil.test",
        "VOICE_AGENT_DEMO_MODE": "false",
        "OPENAI_BASE_URL": "https://api.openai.com/v1",
        "KEYVEIL_AUTH_MODE": "oidc",
        "OIDC_ISSUER": "https://login.keyveil.test",
        "OIDC_AUDIENCE": "keyveil-app",
        "LEDGER_SIGNING_KEY": LEDGER_SEED,
        "LEDGER_CHECKPOINT_DIR": "/var/lib/keyveil/ledger-checkpoints",
        "PROXY_PUBLIC_URL": "https://gw.keyveil.test/api/voice-agent/proxy/v1",
    }
    values.update(overrides)
    return values


def test_template_writes_0600_fresh_secrets_that_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / ".env"
    code, _, _ = run(capsys, "template", "--output", str(target))
    assert code == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    first = parse_env_file(target)
    assert len(first["KEY_ENCRYPTION_SECRET"]) >= 32
    assert first["KEY_ENCRYPTION_SECRET"] != first["PROXY_SIGNING_KEY"]
    assert run(capsys, "validate", "--env-file", str(target))[0] == 0


def test_template_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / ".env"
    target.write_text("KEEP=me\n")
    target.chmod(0o644)
    code, _, err = run(capsys, "template", "--output", str(target))
    assert code == 1
    assert "--force" in err
    assert target.read_text() == "KEEP=me\n"
    code, _, _ = run(capsys, "template", "--output", str(target), "--force", "--production")
    assert code == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert parse_env_file(target)["NODE_ENV"] == "production"
    assert run(capsys, "validate", "--env-file", str(target))[0] == 0


def test_validate_accepts_a_good_production_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env_file = write_env(tmp_path / "good.env", **good_env())
    code, out, _ = run(capsys, "validate", "--env-file", str(env_file))
    assert code == 0, out
    assert "OK" in out
    for service in ("token", "proxy", "keymanager", "auditor"):
        assert service in out


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"PROXY_SIGNING_KEY": "short"}, "PROXY_SIGNING_KEY"),
        ({"KEY_ENCRYPTION_SECRET": WEAK}, "KEY_ENCRYPTION_SECRET"),
        ({"ALLOWED_ORIGINS": "http://app.keyveil.test"}, "ALLOWED_ORIGINS"),
        ({"ALLOWED_ORIGINS": "*"}, "ALLOWED_ORIGINS"),
        ({"VOICE_AGENT_DEMO_MODE": "true"}, "VOICE_AGENT_DEMO_MODE"),
        ({"VOICE_AGENT_RATE_LIMIT": "0"}, "VOICE_AGENT_RATE_LIMIT"),
        ({"VOICE_AGENT_TOKEN_DURATION": "86400"}, "VOICE_AGENT_TOKEN_DURATION"),
        ({"VOICE_AGENT_PROXY_RATE_LIMIT": "lots"}, "VOICE_AGENT_PROXY_RATE_LIMIT"),
        ({"NODE_ENV": "sandbox"}, "NODE_ENV"),
        ({"PROXY_SIGNING_KEY": TEST_KEY_ENCRYPTION_SECRET}, "PROXY_SIGNING_KEY"),
        ({"OPENAI_BASE_URL": "http://plain.example"}, "OPENAI_BASE_URL"),
        ({"LEDGER_SIGNING_KEY": ""}, "LEDGER_SIGNING_KEY"),
        ({"LEDGER_SIGNING_KEY": LEDGER_SEED[:-4]}, "LEDGER_SIGNING_KEY"),
        ({"LEDGER_CHECKPOINT_DIR": ""}, "LEDGER_CHECKPOINT_DIR"),
    ],
)
def test_validate_names_the_bad_variable_never_its_value(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    overrides: dict[str, str],
    variable: str,
) -> None:
    values = good_env(**overrides)
    env_file = write_env(tmp_path / "bad.env", **values)
    code, out, err = run(capsys, "validate", "--env-file", str(env_file))
    assert code == 1
    assert f"ERROR {variable}:" in out
    secrets = (values["KEY_ENCRYPTION_SECRET"], values["PROXY_SIGNING_KEY"], WEAK, LEDGER_SEED[:-4])
    for secret in secrets:
        assert secret not in out + err


def test_validate_reads_the_process_environment_by_default(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in good_env(NODE_ENV="production", VOICE_AGENT_DEMO_MODE="on").items():
        monkeypatch.setenv(name, value)
    code, out, _ = run(capsys, "validate", "--service", "token", "--json")
    report = json.loads(out)
    assert code == 1
    assert report["ok"] is False
    assert report["checked"] == ["token"]
    assert any(p.startswith("VOICE_AGENT_DEMO_MODE") for p in report["problems"])


def test_validate_opens_sealed_values_and_reports_ones_that_do_not_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sealed = encrypt_value(
        "PROXY_SIGNING_KEY", TEST_PROXY_SIGNING_KEY, secret=TEST_KEY_ENCRYPTION_SECRET
    )
    env_file = write_env(tmp_path / "sealed.env", **good_env(PROXY_SIGNING_KEY=sealed))
    assert run(capsys, "validate", "--env-file", str(env_file))[0] == 0
    moved = write_env(tmp_path / "moved.env", **good_env(NATS_PASSWORD=sealed))
    code, out, _ = run(capsys, "validate", "--env-file", str(moved))
    assert code == 1
    assert "ERROR NATS_PASSWORD:" in out


def test_encrypt_then_decrypt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = write_env(tmp_path / "k.env", KEY_ENCRYPTION_SECRET=TEST_KEY_ENCRYPTION_SECRET)
    monkeypatch.setattr("sys.stdin", io.StringIO("redis://:pw@redis:6379/0\n"))
    code, out, _ = run(capsys, "encrypt", "REDIS_URL", "--env-file", str(env_file))
    sealed = out.strip()
    assert code == 0
    assert sealed.startswith("enc:v1:")
    assert "pw@" not in sealed
    code, out, _ = run(capsys, "decrypt", "REDIS_URL", sealed, "--env-file", str(env_file))
    assert (code, out.strip()) == (0, "redis://:pw@redis:6379/0")
    code, out, err = run(capsys, "decrypt", "NATS_URL", sealed, "--env-file", str(env_file))
    assert code == 1
    assert "NATS_URL" in err
    assert "pw@" not in out + err


def test_encrypt_refuses_without_a_strong_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("value"))
    empty = write_env(tmp_path / "none.env", OTHER="x")
    code, _, err = run(capsys, "encrypt", "X", "--env-file", str(empty))
    assert code == 1
    assert "KEY_ENCRYPTION_SECRET is not set" in err
    weak = write_env(tmp_path / "weak.env", KEY_ENCRYPTION_SECRET="tooshort")
    code, _, err = run(capsys, "encrypt", "X", "--env-file", str(weak))
    assert code == 1
    assert "tooshort" not in err


def test_posture_scores_a_hardened_environment_above_a_careless_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hardened = good_env(
        NATS_URL="tls://nats:4222",
        NATS_USER="token",
        NATS_PASSWORD="nats-pw-Hj4Kl6Zx8Cv0Bn2Mq5Wr7Ty9Ui1Op3As",
        REDIS_URL="rediss://:pw@redis:6379/0",
        TRUSTED_PROXIES="10.0.0.0/8",
        KEK_PROVIDER="vault-transit",
        VAULT_ADDR="https://vault.internal:8200",
        VAULT_TRANSIT_KEY="keyveil",
        VAULT_K8S_ROLE="keyveil-keymanager",
    )
    careless = {
        "KEY_ENCRYPTION_SECRET": "short",
        "ALLOWED_ORIGINS": "*",
        "VOICE_AGENT_DEMO_MODE": "true",
        "OPENAI_API_KEY": "sk-should-not-be-here-0123456789",
        "TRUSTED_PROXIES": "0.0.0.0/0",
        "VOICE_AGENT_TOKEN_DURATION": "7200",
        "KEK_PROVIDER": "vault-transit",  # ...with nowhere to reach it
    }
    good_file = write_env(tmp_path / "hard.env", **hardened)
    bad_file = write_env(tmp_path / "careless.env", **careless)
    code, out, _ = run(capsys, "posture", "--env-file", str(good_file), "--json")
    good = json.loads(out)
    assert code == 0
    assert good["score"] == 100
    assert good["weak"] == []
    assert good["missing"] == []
    code, out, _ = run(capsys, "posture", "--env-file", str(bad_file), "--json")
    bad = json.loads(out)
    assert bad["score"] < 40
    assert "PROXY_SIGNING_KEY" in bad["missing"]
    assert "VAULT_ADDR" in bad["missing"]
    for variable in (
        "KEY_ENCRYPTION_SECRET",
        "ALLOWED_ORIGINS",
        "VOICE_AGENT_DEMO_MODE",
        "KEYVEIL_AUTH_MODE",  # anonymous issuance
    ):
        assert variable in bad["weak"]
    assert "sk-should-not-be-here" not in out
    code, text, _ = run(capsys, "posture", "--env-file", str(bad_file), "--min-score", "50")
    assert code == 1
    assert f"{bad['score']}/100" in text
    assert "sk-should-not-be-here" not in text


@pytest.mark.parametrize(
    ("extra", "status", "variable", "says"),
    [
        ({}, "weak", "KEK_PROVIDER", "KEK_PROVIDER=vault-transit"),
        ({"NODE_ENV": "development"}, "strong", "KEK_PROVIDER", "development"),
        ({"KEK_PROVIDER": "vault-transit"}, "missing", "VAULT_ADDR", "VAULT_ADDR"),
        (
            {
                "KEK_PROVIDER": "vault-transit",
                "VAULT_ADDR": "https://vault:8200",
                "VAULT_TRANSIT_KEY": "keyveil",
                "VAULT_TOKEN": "hvs.static",
            },
            "weak",
            "VAULT_TOKEN",
            "VAULT_K8S_ROLE",
        ),
        ({"KEK_PROVIDER": "aws-kms"}, "missing", "KMS_KEY_ID", "KMS_KEY_ID"),
        (
            {"KEK_PROVIDER": "aws-kms", "KMS_KEY_ID": "alias/keyveil", "KEY_ENCRYPTION_SECRET": ""},
            "strong",
            "KEK_PROVIDER",
            "AWS KMS",
        ),
    ],
)
def test_posture_grades_where_the_kek_lives(
    extra: dict[str, str], status: str, variable: str, says: str
) -> None:
    from keyveil.commands.env import posture

    checks = {c.name: c for c in posture(good_env(**extra))}
    custody = checks["KEK custody"]
    assert (custody.status, custody.variable) == (status, variable)
    assert says in custody.detail
    if extra.get("KEY_ENCRYPTION_SECRET") == "":
        assert checks["KEY_ENCRYPTION_SECRET set"].status == "strong"


def test_posture_grades_anonymous_issuance_weak_and_a_login_strong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grades = {}
    for mode in ("anonymous", "oidc", "assertion", "guess"):
        env_file = write_env(tmp_path / f"{mode}.env", **good_env(KEYVEIL_AUTH_MODE=mode))
        _, out, _ = run(capsys, "posture", "--env-file", str(env_file), "--json")
        report = json.loads(out)
        check = next(c for c in report["checks"] if c["name"] == "caller authentication")
        grades[mode] = check["status"]
    assert grades == {
        "anonymous": "weak",
        "oidc": "strong",
        "assertion": "strong",
        "guess": "missing",
    }
