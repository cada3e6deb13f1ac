"""The stream catalogue: quotas that keep usage from starving keys and audit, and drift."""

from __future__ import annotations

import re
from dataclasses import replace

from nats.js.api import DiscardPolicy

from shared.streams import (
    STREAMS,
    _differences,
    expected_stream,
    keys_bucket_config,
)
from tests.support import REPO


def test_every_stream_has_a_quota_and_append_only_ones_refuse_when_full() -> None:
    for stream in STREAMS:
        assert (stream.max_bytes or 0) > 0, stream.name
        assert stream.max_msgs == -1, stream.name  # a count limit would erase history
        if stream.deny_purge:
            assert stream.discard is DiscardPolicy.NEW, stream.name
            assert stream.deny_delete, stream.name
        assert not stream.allow_rollup_hdrs, stream.name


def test_quotas_fit_the_servers_file_store() -> None:
    conf = (REPO / "deploy" / "nats" / "nats.conf").read_text()
    match = re.search(r"max_file_store:\s*(\d+)GB", conf)
    assert match is not None
    store = int(match.group(1)) * 1000**3
    total = sum(s.max_bytes or 0 for s in STREAMS) + (keys_bucket_config().max_bytes or 0)
    assert total < store


def test_drift_names_the_changed_fields_and_ignores_server_defaults() -> None:
    audit = expected_stream("KEYVEIL_AUDIT")
    assert _differences(audit, audit) == ()
    assert _differences(replace(audit, max_msgs=1), audit) == ("max_msgs",)
    assert _differences(replace(audit, subjects=["x.>"], deny_purge=False), audit) == (
        "subjects",
        "deny_purge",
    )
    assert _differences(replace(audit, num_replicas=None), audit) == ()
    assert _differences(audit, expected_stream("KEYVEIL_AUDIT", replicas=3)) == ("num_replicas",)
