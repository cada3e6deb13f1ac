"""docs/configuration.md is the settings models, rendered; `env validate`/`posture` read them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import Field

from keyveil.cli import main
from keyveil.configref import REFERENCE_PATH, REGENERATE, render_reference, undocumented
from services.auditor.ledgerkeys import LedgerSigner
from services.auditor.settings import Settings as AuditorSettings
from services.keymanager.settings import Settings as KeymanagerSettings
from services.token.settings import Settings as TokenSettings
from shared.settings import CommonSettings
from tests.support import REPO, TEST_KEY_ENCRYPTION_SECRET, TEST_PROXY_SIGNING_KEY


def test_the_committed_reference_is_what_the_models_generate() -> None:
    committed = (REPO / REFERENCE_PATH).read_text(encoding="utf-8")
    assert committed == render_reference(), f"{REFERENCE_PATH} is stale: run `{REGENERATE}`"


def test_every_settings_field_has_a_description() -> None:
    assert undocumented() == [], "add a docstring under each field, then run " + REGENERATE


def test_an_undocumented_field_is_reported_and_marked() -> None:
    class WithNewField(CommonSettings):
        shiny_new_knob: int = Field(default=3, ge=1, validation_alias="SHINY_NEW_KNOB")

    models = {"token": WithNewField}
    assert undocumented(models) == ["token: SHINY_NEW_KNOB"]
    row = next(line for line in render_reference(models).splitlines() if "SHINY_NEW_KNOB" in line)
    assert "**undocumented**" in row
    assert "≥ 1" in row


def test_the_reference_names_every_variable_with_its_default_and_rule() -> None:
    text = render_reference()
    for needle in (
        "| `ALERT_WEBHOOK_URL` | secret | `unset` |",
        "| `PROXY_PUBLIC_URL` | str | `http://127.0.0.1:8081/api/voice-agent/proxy/v1` |",
        "| `NODE_ENV` (alias `APP_ENV`) | one of development, staging, production |",
        "token: `8080`; proxy: `8081`; keymanager: `8082`; auditor: `8083`",
        "| `VOICE_AGENT_TOKEN_DURATION` | int | `300` | ≥ 10, ≤ 7200 |",
    ):
        assert needle in text, needle
    assert TEST_PROXY_SIGNING_KEY not in text


def test_the_check_flag_fails_on_a_stale_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text("# old\n")
    assert main(["env", "reference", "--check", "--output", str(stale)]) == 1
    assert REGENERATE in capsys.readouterr().err
    assert main(["env", "reference", "--output", str(stale)]) == 0
    assert main(["env", "reference", "--check", "--output", str(stale)]) == 0


def _production(**overrides: str) -> dict[str, str]:
    values = {
        "NODE_ENV": "production",
        "KEY_ENCRYPTION_SECRET": TEST_KEY_ENCRYPTION_SECRET,
        "PROXY_SIGNING_KEY": TEST_PROXY_SIGNING_KEY,
        "ALLOWED_ORIGINS": "https://app.keyveil.test",
        "PROXY_PUBLIC_URL": "https://gw.keyveil.test/api/voice-agent/proxy/v1",
        "KEYVEIL_ALLOW_ANONYMOUS": "true",  # the identity rules: tests/services/token
        "LEDGER_SIGNING_KEY": LedgerSigner.generate().seed_b64(),
        "LEDGER_CHECKPOINT_DIR": "/var/lib/keyveil/ledger",
    }
    values.update(overrides)
    return values


def _validate(tmp_path: Path, capsys: pytest.CaptureFixture[str], **env: str) -> dict[str, object]:
    path = tmp_path / "check.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    main(["env", "validate", "--env-file", str(path), "--json"])
    report: dict[str, object] = json.loads(capsys.readouterr().out)
    return report


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL: String should match pattern"),
        ({"NODE_ENV": "prodution"}, "NODE_ENV: Input should be"),
        (
            {"PROXY_PUBLIC_URL": "http://127.0.0.1:8081/api/voice-agent/proxy/v1"},
            "PROXY_PUBLIC_URL: must be an https URL in production",
        ),
        (
            {"PROXY_PUBLIC_URL": "https://localhost/api/voice-agent/proxy/v1"},
            "PROXY_PUBLIC_URL: must not be a loopback address",
        ),
    ],
)
def test_validate_catches_unknown_values_and_an_unreachable_public_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: dict[str, str], problem: str
) -> None:
    assert _validate(tmp_path, capsys, **_production())["ok"] is True
    report = _validate(tmp_path, capsys, **_production(**overrides))
    assert report["ok"] is False
    assert any(str(p).startswith(problem) for p in report["problems"]), report["problems"]  # type: ignore[attr-defined]


def test_log_level_is_case_insensitive_and_a_bad_one_exits_2_without_a_traceback(
    tmp_path: Path,
) -> None:
    import subprocess
    import sys

    assert AuditorSettings(LOG_LEVEL="debug").log_level == "DEBUG"  # type: ignore[call-arg]
    env = {"PATH": "/usr/bin:/bin", "LOG_LEVEL": "LOUD", "KEYVEIL_PORT": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "services.auditor"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert (
        done.stderr.strip().splitlines()[-1].startswith("keyveil: invalid configuration: LOG_LEVEL")
    )


def test_posture_does_not_grade_a_misspelt_environment_or_a_loopback_url_strong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "posture.env"

    def grade(**env: str) -> dict[str, str]:
        path.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        main(["env", "posture", "--env-file", str(path), "--json"])
        checks = json.loads(capsys.readouterr().out)["checks"]
        return {c["variable"]: c["status"] for c in checks}

    good = grade(**_production())
    assert (good["NODE_ENV"], good["PROXY_PUBLIC_URL"]) == ("strong", "strong")
    typo = grade(**_production(NODE_ENV="prodution"))
    assert typo["NODE_ENV"] == "missing"
    local = grade(**_production(PROXY_PUBLIC_URL="http://127.0.0.1:8081/api/voice-agent/proxy/v1"))
    assert local["PROXY_PUBLIC_URL"] == "weak"


def test_the_token_burst_detector_can_fire_under_the_issuance_limiter() -> None:
    auditor = AuditorSettings()
    token = TokenSettings(PROXY_SIGNING_KEY=TEST_PROXY_SIGNING_KEY)  # type: ignore[call-arg]
    most_issued = token.rate_limit_per_minute * auditor.token_window_s / 60
    assert auditor.token_ip_threshold < most_issued


def test_the_key_age_rule_agrees_with_the_key_manager() -> None:
    import yaml

    keymanager = KeymanagerSettings(
        KEY_ENCRYPTION_SECRET=TEST_KEY_ENCRYPTION_SECRET,  # type: ignore[call-arg]
        NODE_ENV="production",  # type: ignore[call-arg]
    )
    rules = yaml.safe_load((REPO / "deploy/prometheus/rules.yml").read_text())["groups"]
    (rule,) = [r for g in rules for r in g["rules"] if r["alert"] == "KeyveilKeyRotationOverdue"]
    days = int(rule["expr"].rsplit(">", 1)[1].split("*")[0])
    assert days * 86_400 == keymanager.max_key_age_s
