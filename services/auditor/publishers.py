"""Which service may publish which audit event: the one table, checked on intake and on verify.

An audit event arrives on `keyveil.audit.<publisher>`, and NATS permissions make sure
only that service's login can publish there. The event's own `service` field is just
data, so it must equal the publisher named by the subject, and the event's type must be
one that publisher emits. Without this, the token login could write a `key_rotate` the
ledger would show as the key-manager's.

Types are glob patterns over the producers' real types (`grep -rn 'audit(' services/`):
a new audit type needs a line here, or the auditor refuses it and alerts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

__all__ = ["AUDIT_SUBJECT_PREFIX", "PUBLISHERS", "PublisherMismatch", "publisher_mismatch"]

AUDIT_SUBJECT_PREFIX = "keyveil.audit."

# Every service's StreamGuard reports stream drift as an audit event (shared/events.py).
_DRIFT = "stream.drift"

PUBLISHERS: Mapping[str, tuple[str, ...]] = {
    # services/keymanager: keys.py, leasing.py, admin.py, custody.py, recovery.py
    "keymanager": (
        "key_*",
        "keys_*",
        "kek_*",
        "custody_*",
        "lease_*",
        "admin_*",
        "rotation_*",
        "decrypt_failed",
        _DRIFT,
    ),
    # services/token/app.py: a token holder's signed DELETE
    "token": ("token.revoked", _DRIFT),
    # keyveil/commands (the operator login): `keyveil tokens revoke` and operator actions
    "operator": ("token.revoked", "operator.*", "voice.session.close_requested"),
    # The proxy: the voice broker's sideband actions (services/proxy/voice), and drift.
    "proxy": ("voice.policy.*", "voice.session.*", _DRIFT),
    "auditor": (_DRIFT,),
}


@dataclass(frozen=True)
class PublisherMismatch:
    """Why an event may not have come from its subject; `code` is stable (metrics, alerts)."""

    code: str
    reason: str


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 64 else text[:61] + "..."


def publisher_mismatch(subject: str, event: Mapping[str, Any]) -> PublisherMismatch | None:
    """None when `event` may have been published on `subject`, else what is wrong."""
    if not subject.startswith(AUDIT_SUBJECT_PREFIX):
        return PublisherMismatch("not_audit_subject", f"{_short(subject)} is not an audit subject")
    publisher = subject.removeprefix(AUDIT_SUBJECT_PREFIX)
    allowed = PUBLISHERS.get(publisher)
    if allowed is None:
        return PublisherMismatch("unknown_publisher", f"no audit publisher {_short(publisher)}")
    service = event.get("service")
    if service != publisher:
        return PublisherMismatch(
            "service_mismatch", f"event says service {_short(service)} but came from {publisher}"
        )
    event_type = event.get("type")
    if not isinstance(event_type, str) or not any(fnmatchcase(event_type, p) for p in allowed):
        return PublisherMismatch(
            "type_not_allowed", f"{publisher} may not emit {_short(event_type)}"
        )
    return None
