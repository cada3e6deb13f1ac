"""Zero exposure: a canary provider key must appear on no channel anyone can read.

The whole system runs as `keyveil up` processes with a unique canary key. Every flow
is driven (each token mode, every proxy endpoint, errors, rate limits, rotation,
revocation, admin commands, alerts) while we capture what an attacker or an operator
could read: service logs and stderr (trace spans are exported to them too), every HTTP
response body and header, every NATS message on every subject (the read-only
`observer` user), every Redis key and value, every /metrics page, the JetStream
streams and the whole state directory on disk. The canary, base64'd at each
alignment or URL-encoded, must be found nowhere; only the fake provider may see it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import nats
import pytest
import redis

from services.proxy.settings import with_database
from tests.stack import ORIGIN, Stack, fake_calls, operator_nats, running_stack, signed_headers

pytestmark = pytest.mark.slow

CANARY = f"sk-canary-{secrets.token_urlsafe(30)}"
ROTATED_CANARY = f"sk-canary-rotated-{secrets.token_urlsafe(30)}"
PROXY = "/api/voice-agent/proxy/v1"


def canary_forms(secret: str) -> list[bytes]:
    """The secret as bytes, URL-encoded, and base64'd at each of the three alignments.

    Embedded in a longer payload, a base64 encoding differs only in the few characters
    that mix with neighbouring bytes, so the middle of each alignment's encoding is
    what any base64 copy of the secret must contain.
    """
    raw = secret.encode()
    forms = {raw, quote(secret, safe="").encode()}
    for pad in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            forms.add(encode(b"\0" * pad + raw)[4:-4])
    return sorted(forms, key=len)


@dataclass
class Findings:
    """Every place a canary form turned up, with a redacted excerpt."""

    secrets: list[str]
    hits: list[str] = field(default_factory=list)
    scanned: dict[str, int] = field(default_factory=dict)

    def scan(self, channel: str, data: bytes | str) -> None:
        blob = data.encode(errors="replace") if isinstance(data, str) else data
        self.scanned[channel.split(":")[0]] = self.scanned.get(channel.split(":")[0], 0) + 1
        for secret in self.secrets:
            for form in canary_forms(secret):
                at = blob.find(form)
                if at >= 0:
                    excerpt = blob[max(0, at - 40) : at].decode(errors="replace")
                    self.hits.append(f"{channel}: ...{excerpt}[CANARY {len(form)} bytes]")


def test_the_scanner_finds_every_form() -> None:
    findings = Findings([CANARY])
    findings.scan("positive-control", b"x" + base64.b64encode(b"ab" + CANARY.encode()) + b"y")
    findings.scan("positive-control", f"Authorization: Bearer {quote(CANARY)}")
    assert len(findings.hits) == 2


@dataclass
class Recorder:
    """Keeps every HTTP response (status line, headers, body) the suite received."""

    responses: list[bytes] = field(default_factory=list)

    def __call__(self, response: httpx.Response) -> httpx.Response:
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        self.responses.append(f"{response.status_code}\n{headers}\n".encode() + response.content)
        return response


@pytest.fixture(scope="module")
def canary_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {
        "OPENAI_API_KEY": CANARY,
        "OTEL_TRACES_EXPORTER": "console",  # trace exports land in the logs we scan
        "VOICE_AGENT_PROXY_RATE_LIMIT": "40",
        "VOICE_AGENT_RATE_LIMIT": "200",
        "LOG_LEVEL": "DEBUG",
    }
    with running_stack(tmp_path_factory.mktemp("canary"), env=env) as stack:
        yield stack


def keyveil(stack: Stack, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keyveil.cli", "--state-dir", str(stack.state_dir), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class Driver:
    """Drives every flow through the public HTTP edges and the operator CLI."""

    def __init__(self, stack: Stack, record: Recorder) -> None:
        self.stack = stack
        self.client = httpx.Client(timeout=15)
        self.record = record
        self.proxy = stack.url("proxy")
        self.cli_output: list[str] = []

    def token(self, mode: str = "proxy") -> dict[str, Any]:
        answer = self.record(
            self.client.post(
                f"{self.stack.url('token')}/api/voice-agent/secure-token",
                json={"mode": mode},
                headers={"Origin": ORIGIN},
            )
        )
        return dict(answer.json())

    def call(
        self, token: dict[str, Any], suffix: str, body: bytes, content_type: str, **kw: Any
    ) -> httpx.Response:
        path = f"{PROXY}/{suffix}"
        headers = signed_headers(
            token,
            method="POST",
            path=path,
            body=body,
            authority=urlsplit(self.proxy).netloc,
            content_type=content_type,
        )
        headers.update(kw.pop("headers", {}))
        with self.client.stream("POST", f"{self.proxy}{path}", content=body, headers=headers) as r:
            r.read()
            return self.record(r)

    def chat(self, token: dict[str, Any], stream: bool = False) -> httpx.Response:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return self.call(token, "chat/completions", json.dumps(body).encode(), "application/json")

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        done = keyveil(self.stack, *args, stdin=stdin)
        self.cli_output.append(done.stdout + done.stderr)
        return done

    def fake(self, **behaviour: Any) -> None:
        httpx.post(f"{self.stack.info['fake_upstream_url']}/_fake/behaviour", json=behaviour)

    def every_flow(self) -> None:
        for mode in ("proxy", "realtime", "auto"):
            assert "mode" in self.token(mode)
        token = self.token("proxy")
        assert self.chat(token).status_code == 200
        assert self.chat(token, stream=True).status_code == 200
        speech = json.dumps({"model": "gpt-4o-mini-tts", "voice": "alloy", "input": "hi"})
        assert (
            self.call(token, "audio/speech", speech.encode(), "application/json").status_code == 200
        )
        boundary = "keyveilcanary"
        multipart = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            f"Content-Type: audio/wav\r\n\r\nRIFFxxxxWAVE\r\n--{boundary}--\r\n"
        ).encode()
        stt = self.call(
            token, "audio/transcriptions", multipart, f"multipart/form-data; boundary={boundary}"
        )
        assert stt.status_code == 200

        # Errors: upstream failures, bad tokens, bad signatures, unknown paths, replays.
        for status in (400, 401, 429, 500):
            self.fake(fail_status=status, retry_after=1)
            assert self.chat(token).status_code >= 400
        self.fake()
        forged = dict(token, token=token["token"][:-4] + "AAAA")
        assert self.chat(forged).status_code == 401
        wrong_key = dict(token, signing_key=base64.urlsafe_b64encode(b"k" * 32).decode())
        assert self.chat(wrong_key).status_code in (400, 401)
        assert self.call(token, "models", b"{}", "application/json").status_code == 404
        # Rate limit: the per-token limit is 40 per minute here.
        statuses = [self.chat(token).status_code for _ in range(45)]
        assert 429 in statuses

        # Revocation: by the holder (signed DELETE) and by the operator.
        held = self.token("proxy")
        path = f"/api/voice-agent/secure-token/{held['token_id']}"
        headers = signed_headers(
            held,
            method="DELETE",
            path=path,
            body=None,
            authority=urlsplit(self.stack.url("token")).netloc,
            content_type=None,
        )
        deleted = self.client.delete(f"{self.stack.url('token')}{path}", headers=headers)
        assert self.record(deleted).is_success
        assert self.chat(held).status_code == 401
        operator_revoked = self.token("proxy")
        assert self.cli("tokens", "revoke", "--", operator_revoked["token_id"]).returncode == 0

        # Key administration: list, show, rotate to a second canary, use it, revoke.
        listed = self.cli("keys", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        key_id = json.loads(listed.stdout)[0]["key_id"]
        assert self.cli("keys", "show", key_id).returncode == 0
        rotated = self.cli("keys", "rotate", key_id, "--grace-seconds", "60", stdin=ROTATED_CANARY)
        assert rotated.returncode == 0, rotated.stderr
        assert self.chat(self.token("proxy")).status_code == 200
        assert self.cli("keys", "rewrap").returncode == 0
        assert self.cli("keys", "list", "--all").returncode == 0

        self.voice_flows()

        # Alerts: a burst of forged tokens from one client.
        for _ in range(30):
            self.chat(forged)
        self.cli("alerts", "tail", "-n", "50")
        self.cli("audit", "tail", "-n", "200")
        self.cli("audit", "verify")

    def voice_flows(self) -> None:
        """Brokered voice: sessions, sidebands metering usage, policy refusals, endings."""
        offer = asyncio.run(_real_offer())
        self.fake(voice_tick_ms=100)
        token = self.token("proxy")
        live = {"session": {"model": "gpt-live-1"}, "transport": {"type": "webrtc", "sdp": offer}}
        answer = self.call(token, "live/sessions", json.dumps(live).encode(), "application/json")
        assert answer.status_code == 201, answer.text
        session_id = answer.json()["session"]["id"]
        boundary = "keyveilvoice"
        call = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="sdp"\r\n\r\n{offer}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="session"\r\n\r\n'
            '{"type": "realtime", "model": "gpt-realtime"}\r\n'
            f"--{boundary}--\r\n"
        ).encode()
        called = self.call(
            token, "realtime/calls", call, f"multipart/form-data; boundary={boundary}"
        )
        assert called.status_code == 201, called.text
        call_id = called.headers["x-keyveil-call-id"]
        refused = dict(live, session={"model": "gpt-live-1", "store": True})
        assert (
            self.call(
                token, "live/sessions", json.dumps(refused).encode(), "application/json"
            ).status_code
            == 400
        )
        self.fake(voice_tick_ms=100, fail_status=500, fail_paths=["/v1/live/sessions"])
        failed = self.call(token, "live/sessions", json.dumps(live).encode(), "application/json")
        assert failed.status_code == 502
        self.fake(voice_tick_ms=100)
        time.sleep(1.5)  # usage ticks through both sidebands
        assert self.cli("sessions", "list", "--json").returncode == 0
        assert self.cli("sessions", "show", session_id).returncode == 0
        assert self.cli("sessions", "close", call_id).returncode == 0
        assert self.cli("tokens", "revoke", "--", token["token_id"]).returncode == 0
        time.sleep(1.5)  # the revocation ends the live session
        self.fake()
        fake = self.stack.info["fake_upstream_url"]
        for ident in (session_id, call_id):
            state = httpx.get(f"{fake}/_fake/sessions/{ident}").json()
            # Positive control: the key did reach the provider, and the sideband attached.
            assert state["authorization"] in (f"Bearer {CANARY}", f"Bearer {ROTATED_CANARY}")
            assert state["sideband_connects"] >= 1
            assert state["state"] == "closed"


async def _real_offer() -> str:
    from aiortc import AudioStreamTrack, RTCConfiguration, RTCPeerConnection

    from shared.testing import fake_voice  # noqa: F401 - ICE on loopback

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(AudioStreamTrack())
    pc.createDataChannel("oai-events")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = str(pc.localDescription.sdp)
    await pc.close()
    return sdp


async def sniff(stack: Stack, findings: Findings, done: asyncio.Event) -> int:
    """Scan every message on every subject until `done`; returns the message count."""
    nc = await operator_nats(stack, "observer")
    seen = 0

    async def on_message(msg: nats.aio.msg.Msg) -> None:
        nonlocal seen
        seen += 1
        headers = json.dumps(msg.headers or {})
        findings.scan(f"nats:{msg.subject}", msg.data + headers.encode())

    await nc.subscribe(">", cb=on_message)
    await done.wait()
    await nc.flush()
    await nc.close()
    return seen


def scan_redis(stack: Stack, findings: Findings) -> int:
    count = 0
    # Database 0: limits, nonces, revocations; database 1: the proxy's response cache.
    for db in (0, 1):
        url = with_database(stack.info["redis_url"], db)
        count += _scan_database(redis.Redis.from_url(url), findings)
    return count


def _scan_database(client: redis.Redis, findings: Findings) -> int:
    count = 0
    for key in client.scan_iter(count=500):
        count += 1
        kind = client.type(key).decode()
        value: Any
        if kind == "string":
            value = client.get(key)
        elif kind == "hash":
            value = client.hgetall(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "set":
            value = client.smembers(key)
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        else:
            value = kind
        findings.scan(f"redis:{key!r}", repr(key).encode() + repr(value).encode())
    return count


async def test_the_canary_key_appears_on_no_channel(canary_stack: Stack) -> None:
    stack = canary_stack
    findings = Findings([CANARY, ROTATED_CANARY])
    record = Recorder()
    done = asyncio.Event()
    sniffer = asyncio.create_task(sniff(stack, findings, done))
    await asyncio.sleep(0.5)

    driver = Driver(stack, record)
    try:
        await asyncio.to_thread(driver.every_flow)
    finally:
        driver.client.close()
    await asyncio.sleep(2)  # let events, alerts and logs settle
    for name, url in stack.info["metrics_urls"].items():
        findings.scan(f"metrics:{name}", httpx.get(url).content)
    done.set()
    messages = await sniffer

    for i, response in enumerate(record.responses):
        findings.scan(f"http-response:{i}", response)
    for i, output in enumerate(driver.cli_output):
        findings.scan(f"cli-output:{i}", output)
    redis_keys = scan_redis(stack, findings)
    # The state directory holds every log (stderr included), the JetStream store (all
    # streams and the key bucket), Redis' append-only file and generated secrets.
    files = [p for p in stack.state_dir.rglob("*") if p.is_file()]
    for path in files:
        findings.scan(f"disk:{path.relative_to(stack.state_dir)}", path.read_bytes())

    # Positive control: the provider really received the canary, from the key-manager.
    seen_keys = {c["authorization"] for c in fake_calls(stack)}
    assert f"Bearer {CANARY}" in seen_keys
    assert f"Bearer {ROTATED_CANARY}" in seen_keys

    assert messages > 50
    assert redis_keys > 0
    assert len(record.responses) > 60
    assert findings.hits == [], "canary exposed:\n" + "\n".join(findings.hits[:20])
