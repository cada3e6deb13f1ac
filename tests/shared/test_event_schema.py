"""Event schema v2: typed reasons and details, read from recorded v1 and v2 streams alike.

The fixtures are what real stacks published (tests/fixtures/events/record.py): `v1/` with
the code before the typed reasons, `v2/` with this one. The auditor reads both for the
streams' retention period, and must reach the same verdicts from either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.auditor.detectors import Detectors, Finding
from shared.contract import Category, Refusal
from shared.events import SCHEMA_VERSION, AuditEvent, UsageEvent
from shared.eventschema import (
    CLIENT_GONE,
    ClientGone,
    Fallback,
    Kek,
    Lease,
    LegacyDetail,
    Listed,
    OtherDetail,
    OtherReason,
    Refused,
    RefusedDetail,
    Rejected,
    RotationDue,
    Served,
    StreamDrift,
    TokenRevoked,
    detail_from_v1,
    json_schema,
    reason_from_v1,
)
from tests.services.auditor.helpers import T0, settings
from tests.support import REPO

FIXTURES = Path(__file__).parents[1] / "fixtures" / "events"
SCHEMA_FILE = REPO / "docs" / "events.schema.json"


def _lines(version: str, stream: str) -> list[bytes]:
    text = (FIXTURES / version / f"{stream}.jsonl").read_bytes()
    return [line for line in text.splitlines() if line.strip()]


def _usage(version: str) -> list[UsageEvent]:
    return [UsageEvent.model_validate_json(line) for line in _lines(version, "usage")]


def _audit(version: str) -> list[AuditEvent]:
    return [AuditEvent.model_validate_json(line) for line in _lines(version, "audit")]


# What the recorded traffic refused, and the category each refusal must be read as.
REFUSALS = {
    ("proxy.request", "token_missing"): Category.auth,
    ("proxy.request", "signature_invalid"): Category.tamper,
    ("proxy.request", "replay_detected"): Category.replay,
    ("proxy.request", "digest_mismatch"): Category.tamper,
    ("proxy.request", "model_not_allowed"): Category.policy,
    ("proxy.request", "upstream_error"): Category.upstream,
    ("proxy.request", "token_revoked"): Category.auth,
    ("token.denied", "origin_forbidden"): Category.auth,
    ("token.denied", "rate_limited"): Category.limit,
    ("token.revoke_denied", "replay_detected"): Category.replay,
}  # the v2 recording also has the IP block that followed (ip_blocked: blocked)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_recorded_refusals_are_read_with_their_category(version: str) -> None:
    events = _usage(version)
    expected = {1: 1, 2: 2}[int(version[1])]
    assert all(e.schema_version == expected for e in events)
    found = {
        (e.type, str(e.reason.code)): e.reason.category
        for e in events
        if isinstance(e.reason, Refused)
    }
    assert REFUSALS.items() <= found.items()
    assert all(category is Refusal(code).category for (_, code), category in found.items())
    for event in events:
        if isinstance(event.reason, Refused):
            assert isinstance(event.reason.code, Refusal), "every recorded code is a contract code"
            assert event.outcome == ("error" if event.status and event.status >= 500 else "denied")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_recorded_served_outcomes_are_typed(version: str) -> None:
    events = _usage(version)
    served = [e.reason for e in events if isinstance(e.reason, Served)]
    assert sorted(s.via for s in served) == ["cache", "demo"]
    [fallback] = [e.reason for e in events if isinstance(e.reason, Fallback)]
    assert (fallback.code, fallback.category) == (Refusal.UPSTREAM_ERROR, Category.upstream)
    plain = [e for e in events if e.reason is None]
    assert plain
    assert all(e.outcome == "ok" for e in plain)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_recorded_audit_details_are_typed(version: str) -> None:
    events = _audit(version)
    by_type: dict[str, list[Any]] = {}
    for event in events:
        by_type.setdefault(f"{event.service}:{event.type}", []).append(event.detail)
    assert not any(isinstance(d, LegacyDetail | OtherDetail) for ds in by_type.values() for d in ds)
    [due] = by_type["keymanager:rotation_due"][:1]
    assert isinstance(due, RotationDue)
    assert due.age_s >= 1
    assert due.max_age_s == 1
    assert all(
        isinstance(d, Lease) and d.kem == "x25519" for d in by_type["keymanager:lease_granted"]
    )
    [verified] = by_type["keymanager:kek_verify"]
    assert isinstance(verified, Kek)
    assert verified.kek_provider == "local"
    assert by_type["keymanager:key_bootstrap"] == [None]
    assert by_type["keymanager:admin_list"] == [Listed(count=1)]
    [holder] = by_type["token:token.revoked"]
    assert isinstance(holder, TokenRevoked)
    assert holder.via == "signed_delete"
    assert holder.session_id
    [operator] = by_type["operator:token.revoked"]
    assert isinstance(operator, TokenRevoked)
    assert (operator.via, operator.ttl_s, operator.reason) == ("cli", 60, "leaked")


def _verdicts(usage: list[UsageEvent], audit: list[AuditEvent]) -> list[tuple[str, str]]:
    """Every recorded refusal repeated into bursts on one timeline, fed to fresh detectors."""
    detectors = Detectors(settings(auth_failure_threshold=5))
    refused = [e for e in usage if e.outcome == "denied"]
    found: list[Finding] = []
    for i in range(6):
        for j, event in enumerate(refused):
            ts = T0 + i * 10 + j * 0.01
            found += detectors.observe_usage(event.model_copy(update={"ts": ts}))
    for event in audit:
        found += detectors.observe_audit(event)
    return sorted((f.type, f.labels.get("reason", "")) for f in found)


def test_v1_and_v2_recordings_reach_the_same_verdicts() -> None:
    v1 = _verdicts(_usage("v1"), _audit("v1"))
    v2 = _verdicts(_usage("v2"), _audit("v2"))
    assert v1 == v2
    kinds = {kind for kind, _ in v2}
    assert {"auth_failure_burst", "replay_attempts", "tampering_attempts", "rotation_overdue"} <= (
        kinds
    )


def test_v2_events_round_trip_and_say_their_version() -> None:
    for line in _lines("v2", "usage"):
        raw = json.loads(line)
        assert raw["schema_version"] == SCHEMA_VERSION == 2
        reason = raw["reason"]
        assert reason is None or reason["kind"] in {"refused", "served", "fallback"}
        event = UsageEvent.model_validate_json(line)
        assert UsageEvent.model_validate_json(event.model_dump_json()) == event
    for line in _lines("v2", "audit"):
        # Always an object ({} for none): an auditor still on v1 (detail: dict) reads it.
        assert isinstance(json.loads(line)["detail"], dict)
        event = AuditEvent.model_validate_json(line)
        assert AuditEvent.model_validate_json(event.model_dump_json()) == event


def test_a_v1_event_read_back_after_dumping_keeps_its_meaning() -> None:
    """An upgraded v1 event dumped (schema_version 1, typed values) reads back the same."""
    for event in _usage("v1"):
        assert UsageEvent.model_validate_json(event.model_dump_json()) == event
    for audit in _audit("v1"):
        assert AuditEvent.model_validate_json(audit.model_dump_json()) == audit


AUTH, TAMPER, REPLAY, LIMIT = Category.auth, Category.tamper, Category.replay, Category.limit
BAD = Category.bad_request


@pytest.mark.parametrize(
    ("reason", "outcome", "event_type", "status", "expected"),
    [
        ("signature", "denied", "proxy.rejected", 401, Refused(code="signature", category=TAMPER)),
        ("nonce_reused", "denied", "proxy.rejected", 401, Refused(code="nonce_reused",
                                                                 category=REPLAY)),
        ("expired", "denied", "proxy.rejected", 401, Refused(code="expired", category=AUTH)),
        ("invalid_login_audience", "denied", "token.denied", 401,
         Refused(code=Refusal.LOGIN_INVALID, category=AUTH, why="audience")),
        ("someday", "denied", "proxy.request", 429, Refused(code="someday", category=LIMIT)),
        ("Not A Code!", "denied", "proxy.request", 400, Refused(code="v1_unknown", category=BAD)),
        ("client_gone", "ok", "proxy.request", 499, ClientGone()),
        ("cache_hit", "ok", "proxy.request", 200, Served(via="cache")),
        ("upstream_timeout", "ok", "token.issued", 200,
         Fallback(code="upstream_timeout", category=Category.upstream)),
    ],
)  # fmt: skip
def test_v1_reasons_map_onto_their_category(
    reason: str, outcome: str, event_type: str, status: int, expected: object
) -> None:
    got = reason_from_v1(reason, outcome=outcome, event_type=event_type, status=status)
    assert got == expected


def test_v1_budget_warning_names_its_budget() -> None:
    event = UsageEvent.model_validate(
        {"schema_version": 1, "service": "proxy", "type": "voice.budget.warning",
         "reason": "token-micros-day"}
    )  # fmt: skip
    assert event.reason is not None
    assert event.reason.kind == "budget_warning"
    assert event.reason.model_dump() == {"kind": "budget_warning", "budget": "token-micros-day"}


@pytest.mark.parametrize(
    ("event_type", "outcome", "detail", "expected"),
    [
        ("rotation_due", "failure", {"age_days": 95}, RotationDue(age_s=95 * 86_400)),
        ("lease_denied", "denied", {"key_id": None, "reason": "requester_mismatch"},
         RefusedDetail(code=Refusal.REQUESTER_MISMATCH, category="auth")),
        ("lease_failed", "failure", {"reason": "internal"},
         RefusedDetail(code="internal", category="internal")),
        ("key_store", "denied", {"reason": "duplicate"}, Rejected(reason="duplicate")),
        ("decrypt_failed", "failure", {"reason": "integrity"}, Rejected(reason="integrity")),
        ("stream.drift", "failure", {"streams": {"KEYVEIL_USAGE": ["max_msgs"]}},
         StreamDrift(streams={"KEYVEIL_USAGE": ["max_msgs"]})),
        ("key_store", "success", {}, None),
    ],
)  # fmt: skip
def test_v1_details_become_their_model(
    event_type: str, outcome: str, detail: dict[str, Any], expected: object
) -> None:
    assert detail_from_v1(event_type, outcome, detail) == expected


def test_a_v1_detail_that_fits_no_model_is_kept_not_refused() -> None:
    """The ledger needs every audit event: an odd v1 detail is never a reason to term it."""
    raw = {"service": "keymanager", "type": "lease_granted", "actor": "proxy",
           "schema_version": 1, "detail": {"n": 3, "note": "ünïcode"}}  # fmt: skip
    event = AuditEvent.model_validate(raw)
    assert isinstance(event.detail, LegacyDetail)
    assert event.detail.model_dump() == {"kind": "v1", "n": 3, "note": "ünïcode"}


def test_unknown_kinds_and_codes_from_a_newer_producer_are_read_not_refused() -> None:
    """A newer producer's refusal code still counts by its category; a new reason or
    detail kind is kept; unknown fields are ignored."""
    base = {"service": "proxy", "type": "proxy.request", "outcome": "denied", "schema_version": 3}
    newer = UsageEvent.model_validate(
        {**base, "reason": {"kind": "refused", "code": "quantum_denied", "category": "auth",
                            "colour": "red"}, "brand_new_field": 1}
    )  # fmt: skip
    assert newer.reason == Refused(code="quantum_denied", category=Category.auth)
    other = UsageEvent.model_validate(
        {**base, "reason": {"kind": "teleported", "category": "tamper"}}
    )
    assert other.reason == OtherReason(kind="teleported", category=Category.tamper)
    audit = AuditEvent.model_validate(
        {"service": "keymanager", "type": "key_store", "actor": "x", "schema_version": 2,
         "detail": {"kind": "hologram", "depth": 3}}
    )  # fmt: skip
    assert isinstance(audit.detail, OtherDetail)
    assert audit.detail.model_dump()["depth"] == 3

    detectors = Detectors(settings(auth_failure_threshold=3, tamper_threshold=2))
    burst = [newer.model_copy(update={"ts": T0 + i}) for i in range(3)]
    burst += [other.model_copy(update={"ts": T0 + 3 + i}) for i in range(2)]
    found = {f.type for e in burst for f in detectors.observe_usage(e)}
    assert found == {"auth_failure_burst", "tampering_attempts"}


def test_a_v2_event_must_carry_a_typed_reason() -> None:
    with pytest.raises(ValueError, match="reason"):
        UsageEvent.model_validate(
            {"service": "proxy", "type": "t", "schema_version": 2, "reason": "token_missing"}
        )
    with pytest.raises(ValueError, match="code"):
        Refused(code="Not a code", category=Category.auth)


def test_refused_of_an_error_takes_the_contract_category() -> None:
    assert Refused.of(Refusal.DIGEST_MISMATCH.error()) == Refused(
        code=Refusal.DIGEST_MISMATCH, category=Category.tamper
    )
    from shared.errors import ApiError

    odd = ApiError("teapot", code="Teapot Error")
    odd.status = 503
    assert Refused.of(odd) == Refused(code="not_a_code", category=Category.unavailable)
    assert CLIENT_GONE.model_dump() == {"kind": "client_gone"}


def test_the_json_schema_document_is_current() -> None:
    """docs/events.schema.json is `python -m shared.eventschema` (regenerate it if not)."""
    current = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    assert SCHEMA_FILE.read_text() == current
    schema = json.loads(current)
    reason = json.dumps(schema["$defs"]["UsageEvent"]["properties"]["reason"])
    assert "Refused" in reason
    assert "Served" in reason
