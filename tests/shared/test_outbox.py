"""The event outbox: lines kept until settled, claimed only from dead processes, replayed
once into JetStream (a real nats-server; the killed process is a real child process)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from shared.errors import ConfigError
from shared.events import EventPublisher
from shared.outbox import Outbox
from tests.stack import read_stream
from tests.support import REPO


def test_a_live_owners_segments_are_not_claimed_and_a_closed_ones_are(tmp_path: Path) -> None:
    owner = Outbox(tmp_path)
    first = owner.append("keyveil.usage.proxy", "id-1", b'{"event_id":"id-1"}')
    owner.append("keyveil.usage.proxy", "id-2", b'{"event_id":"id-2"}')
    assert first is not None
    owner.settle(first)  # acknowledged; still in the live segment (append-only)

    assert Outbox(tmp_path).claim_orphans(100) == []  # the owner holds the lock

    owner.close()  # as its death would: the lock goes, the unsettled segment stays
    successor = Outbox(tmp_path)
    replayed = successor.claim_orphans(100)
    assert [(r.subject, r.msg_id, r.payload) for r in replayed] == [
        ("keyveil.usage.proxy", "id-1", b'{"event_id":"id-1"}'),
        ("keyveil.usage.proxy", "id-2", b'{"event_id":"id-2"}'),
    ]
    assert Outbox(tmp_path).claim_orphans(100) == []  # the successor holds it now
    for event in replayed:
        successor.settle(event.segment)
    assert list(tmp_path.glob("*.outbox")) == []  # all settled: deleted


def test_settled_segments_are_deleted_so_the_outbox_stays_bounded(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, segment_bytes=200)

    def payload(i: int) -> bytes:
        return b'{"event_id":"id-%d","pad":"%s"}' % (i, b"x" * 60)

    segments = [outbox.append("keyveil.usage.proxy", f"id-{i}", payload(i)) for i in range(20)]
    assert len(list(tmp_path.glob("*.outbox"))) > 3  # rotated
    for segment in segments:
        assert segment is not None
        outbox.settle(segment)
    [live] = tmp_path.glob("*.outbox")  # only the live segment is left, emptied
    assert live.stat().st_size == 0
    outbox.append("keyveil.usage.proxy", "id-20", payload(20))
    assert live.stat().st_size > 0  # appended after the truncation, from offset 0
    outbox.close()
    assert [r.msg_id for r in Outbox(tmp_path).claim_orphans(100)] == ["id-20"]


def test_a_torn_or_foreign_line_is_skipped(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    outbox.append("keyveil.usage.proxy", "id-1", b'{"event_id":"id-1"}')
    outbox.close()
    [segment] = tmp_path.glob("*.outbox")
    with segment.open("ab") as out:
        out.write(b"garbage\n")
        out.write(b'keyveil.usage.proxy id-9 {"event_id":"id-8"}\n')  # not its own id
        # Cut short, then the next line appended to it: neither is a whole event.
        out.write(b'keyveil.usage.proxy id-2 {"event_id":')
        out.write(b'keyveil.usage.proxy id-3 {"event_id":"id-3"}\n')
        out.write(b'keyveil.usage.proxy id-4 {"event_id":"id-4"}\n')
        out.write(b'keyveil.usage.proxy id-5 {"event_id":"id-5"}')  # no newline: cut short
    assert [r.msg_id for r in Outbox(tmp_path).claim_orphans(100)] == ["id-1", "id-4"]


def test_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match="not group/world-writable"):
        Outbox(shared)
    Outbox(tmp_path / "private")  # created 0700
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700


_CHILD = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from pathlib import Path
    import nats
    from shared.events import EventPublisher, UsageEvent

    def event(service, event_id):
        return UsageEvent(service=service, type="proxy.request", event_id=event_id)

    async def main(url, directory, service):
        nc = await nats.connect(url)
        publisher = EventPublisher(nc.jetstream(), outbox_dir=Path(directory))
        publisher.start()
        for i in range(5):
            publisher.emit(event(service, f"{service}-a{i}"))
        assert await publisher.flush(10)  # published, acknowledged, the outbox emptied
        for i in range(2):  # in the stream already, as if their acks died with the process
            early = event(service, f"{service}-b{i}")
            data, headers = early.model_dump_json().encode(), {"Nats-Msg-Id": early.event_id}
            await nc.jetstream().publish(early.subject, data, headers=headers)
        for i in range(5):
            publisher.emit(event(service, f"{service}-b{i}"))
        os.kill(os.getpid(), signal.SIGKILL)  # before the publishing task ever sees these

    asyncio.run(main(*sys.argv[1:]))
    """
)


async def test_events_of_a_killed_process_are_replayed_once(nc: NATS, tmp_path: Path) -> None:
    service = f"replay{uuid.uuid4().hex[:8]}"
    url = nc.connected_url
    assert url is not None
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, url.geturl(), str(tmp_path), service],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    assert list(tmp_path.glob("*.outbox")), "the killed process left no outbox"

    successor = EventPublisher(nc.jetstream(), outbox_dir=tmp_path)
    successor.start()
    assert successor.pending == 5  # the five unacknowledged, two of which JetStream has
    assert await successor.flush(10)
    await successor.close()

    ids = [msg.split(b'"event_id":"')[1].split(b'"')[0].decode() for msg in
           await read_stream(nc, f"keyveil.usage.{service}")]  # fmt: skip
    assert sorted(ids) == sorted(
        [f"{service}-a{i}" for i in range(5)] + [f"{service}-b{i}" for i in range(5)]
    )
    assert list(tmp_path.glob("*.outbox")) == []  # acknowledged, then deleted
