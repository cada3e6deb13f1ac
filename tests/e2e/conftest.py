"""The end-to-end suites share one `keyveil up --fake-upstream` for the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.stack import Stack, running_stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Every e2e suite issues tokens from 127.0.0.1: the production default (10 a minute
    # per IP) would make the suites starve each other.
    env = {"VOICE_AGENT_RATE_LIMIT": "600"}
    with running_stack(tmp_path_factory.mktemp("stack"), env=env) as running:
        yield running
