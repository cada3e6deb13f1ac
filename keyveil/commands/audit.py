"""`keyveil audit tail|query|verify|keygen`: read the signed audit ledger and check it.

Reads `KEYVEIL_AUDIT_LEDGER` by default (records carry `prev_hash`/`hash`/`signature`);
`--stream` reads another stream of the same shape, or the raw `KEYVEIL_AUDIT` stream.
`verify` needs the ledger's public key(s) (`--verify-key`, `LEDGER_VERIFY_KEY`, derived
from `LEDGER_SIGNING_KEY`, or `<state-dir>/ledger/verify.keys`) and compares the stream
with the signed checkpoints (`--checkpoint-dir`, `LEDGER_CHECKPOINT_DIR`, or
`<state-dir>/ledger/checkpoints`): a ledger shorter than a checkpoint, emptied, started
late, missing its head, holding a foreign record or an event from the wrong publisher
is BROKEN.
Exit codes: 0 fine, 1 the ledger is broken (verify), 2 the bus, stream or keys are
unavailable.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import json
import os
import re
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from keyveil.operator import operator_nats
from services.auditor.checkpoints import CheckpointStore, LoadedCheckpoints, ephemeral_verifier
from services.auditor.ledger import (
    GENESIS_HASH,
    LEDGER_STREAM,
    BrokenLink,
    VerifyResult,
    parse_record,
    read_stream,
    verify_chain,
)
from services.auditor.ledgerkeys import LedgerKeyError, LedgerSigner, LedgerVerifier

__all__ = [
    "STATE_CHECKPOINTS",
    "STATE_VERIFY_KEYS",
    "accept_foreign",
    "parse_since",
    "register",
    "verify_keys",
    "verify_ledger",
]

# Where `keyveil up` leaves the ledger's public key and checkpoints in its state dir.
STATE_VERIFY_KEYS = Path("ledger") / "verify.keys"
STATE_CHECKPOINTS = Path("ledger") / "checkpoints"

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("audit", help="read and verify the tamper-evident audit trail")
    sub = parser.add_subparsers(dest="audit_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--stream", default=LEDGER_STREAM.name, help="stream to read")
        p.add_argument("--json", action="store_true", help="one JSON object per line")

    tail = sub.add_parser("tail", help="the latest records, optionally following new ones")
    tail.add_argument("-n", "--lines", type=int, default=20, help="records to show (20)")
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    common(tail)

    query = sub.add_parser("query", help="records since a time, filtered by type")
    query.add_argument(
        "--since", required=True, help="a duration back from now (30m, 6h, 7d) or an ISO time"
    )
    query.add_argument(
        "--type", action="append", default=[], help="event type or glob (repeatable)"
    )
    query.add_argument("--key-id", help="only records about this key")
    query.add_argument("--outcome", choices=("success", "denied", "failure"))
    query.add_argument("--limit", type=int, default=0, help="stop after this many (0: all)")
    common(query)

    verify = sub.add_parser("verify", help="check signatures, chain and checkpoints")
    verify.add_argument(
        "--verify-key",
        action="append",
        default=[],
        help="a ledger public key, base64url (repeatable; default LEDGER_VERIFY_KEY)",
    )
    verify.add_argument(
        "--checkpoint-dir", help="signed checkpoints to compare with (LEDGER_CHECKPOINT_DIR)"
    )
    verify.add_argument(
        "--accept-foreign",
        action="append",
        type=int,
        default=[],
        metavar="SEQ",
        help="a foreign record already investigated (repeatable); chain breaks still fail",
    )
    common(verify)

    sub.add_parser("keygen", help="print a fresh LEDGER_SIGNING_KEY and its LEDGER_VERIFY_KEY")

    parser.set_defaults(handler=run)


def parse_since(value: str, *, now: float | None = None) -> float:
    """'30m' / '6h' / '7d' back from now, or an ISO-8601 time (UTC when no zone)."""
    now = time.time() if now is None else now
    match = _DURATION.match(value.strip())
    if match:
        return now - float(match.group(1)) * _UNIT_S[match.group(2)]
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since: {value!r} is neither a duration (30m, 6h, 7d) nor an ISO time"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 0
    except argparse.ArgumentTypeError as exc:
        print(f"keyveil audit: {exc}", file=sys.stderr)
        return 2


async def _run(args: argparse.Namespace) -> int:
    if args.audit_command == "keygen":
        signer = LedgerSigner.generate()
        seed = signer.seed_b64()
        print(f"# auditor only; key id {signer.key_id}")
        print(f"LEDGER_SIGNING_KEY={seed}")
        print("# every verifier (keyveil audit verify)")
        print(f"LEDGER_VERIFY_KEY={signer.public_key_b64}")
        return 0
    verifier: LedgerVerifier | None = None
    checkpoints: LoadedCheckpoints | None = None
    if args.audit_command == "verify":
        try:
            verifier = verify_keys(args)
        except LedgerKeyError as exc:
            print(f"keyveil audit: a ledger verify key is unusable ({exc})", file=sys.stderr)
            return 2
        if not len(verifier):
            print(
                "keyveil audit: no ledger verify key (pass --verify-key or set LEDGER_VERIFY_KEY)",
                file=sys.stderr,
            )
            return 2
        directory = _checkpoint_dir(args)
        if directory is None:
            print(
                "keyveil audit: note: no checkpoint directory; a shortened head goes unseen",
                file=sys.stderr,
            )
        else:
            checkpoints = CheckpointStore(directory).load(args.stream, verifier)
    try:
        nc = await operator_nats(Path(args.state_dir))
    except (OSError, nats.errors.Error) as exc:
        print(f"keyveil audit: cannot reach NATS ({type(exc).__name__})", file=sys.stderr)
        return 2
    try:
        js = nc.jetstream()
        if args.audit_command == "verify":
            assert verifier is not None
            return await _verify(js, args, verifier, checkpoints)
        if args.audit_command == "tail":
            return await _tail(js, args)
        return await _query(js, args)
    except nats.js.errors.NotFoundError:
        print(f"keyveil audit: stream {args.stream} does not exist (yet)", file=sys.stderr)
        return 2
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        print("keyveil audit: JetStream did not answer", file=sys.stderr)
        return 2
    finally:
        await nc.close()


def _production() -> bool:
    return os.environ.get("NODE_ENV", os.environ.get("APP_ENV", "")).strip().lower() in (
        "production",
        "prod",
    )


def _checkpoint_dir(args: argparse.Namespace) -> Path | None:
    if args.checkpoint_dir:
        return Path(args.checkpoint_dir)
    if os.environ.get("LEDGER_CHECKPOINT_DIR"):
        return Path(os.environ["LEDGER_CHECKPOINT_DIR"])
    default = Path(args.state_dir) / STATE_CHECKPOINTS
    return default if default.is_dir() else None


def verify_keys(args: argparse.Namespace) -> LedgerVerifier:
    """--verify-key, else LEDGER_VERIFY_KEY, LEDGER_SIGNING_KEY's public half and the
    state dir's verify.keys; outside production also keys development auditors generated."""
    given = [k for value in args.verify_key for k in value.split(",") if k.strip()]
    if not given:
        given = [k for k in os.environ.get("LEDGER_VERIFY_KEY", "").split(",") if k.strip()]
        seed = os.environ.get("LEDGER_SIGNING_KEY", "")
        if seed:
            given.append(LedgerSigner.from_seed(seed).public_key_b64)
        state_keys = Path(args.state_dir) / STATE_VERIFY_KEYS
        if state_keys.is_file():
            given += [line.strip() for line in state_keys.read_text().splitlines() if line.strip()]
    verifier = LedgerVerifier.from_strings(given)
    directory = _checkpoint_dir(args)
    if directory is not None and not _production():
        verifier = verifier.merged(ephemeral_verifier(directory))
    return verifier


def _problem(seq: int, reason: str, code: str = "truncated") -> VerifyResult:
    return VerifyResult(0, 0, 0, "", problems=(BrokenLink(seq, reason, code),), problem_count=1)


async def verify_ledger(
    js: JetStreamContext,
    stream: str,
    *,
    verifier: LedgerVerifier,
    checkpoints: LoadedCheckpoints | None = None,
) -> VerifyResult:
    """Check `stream` against the keys and the checkpoints: signatures, chain, publishers,
    and that nothing a checkpoint vouched for is gone."""
    cps = checkpoints or LoadedCheckpoints()
    if cps.invalid:
        return _problem(0, f"checkpoint file {cps.invalid[0]} is not validly signed", "checkpoint")
    latest = cps.latest
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        if latest is None:
            raise
        return _problem(latest.seq, f"the ledger stream is gone; checkpoint seq {latest.seq} "
                        f"vouched for {latest.records} records")  # fmt: skip
    first, last, messages = info.state.first_seq, info.state.last_seq, info.state.messages
    if latest is not None and messages == 0:
        return _problem(
            latest.seq, f"the ledger is empty; checkpoint seq {latest.seq} vouched for "
            f"{latest.records} records",
        )  # fmt: skip
    if latest is not None and last < latest.seq:
        return _problem(
            last + 1, f"head deleted: the stream ends at seq {last}, checkpoint vouched for "
            f"seq {latest.seq}",
        )  # fmt: skip
    if messages == 0:
        if last > 0:
            return _problem(last, f"the ledger is empty but {last} records were appended")
        return VerifyResult(0, 0, 0, GENESIS_HASH)
    earliest = min((c.first_seq for c in cps.valid), default=1)
    if first > max(earliest, 1):
        anchored = (
            "no checkpoint anchors it"
            if not cps.valid
            else f"checkpoints count from seq {earliest}"
        )
        return _problem(first - 1, f"truncated: the stream starts at seq {first} and {anchored}")
    anchors = {c.seq: c.hash for c in cps.valid}
    anchor = GENESIS_HASH if first <= 1 else anchors.get(first - 1)
    expect = {seq: digest for seq, digest in anchors.items() if seq >= first}
    records = [item async for item in read_stream(js, stream)]
    return verify_chain(
        records, verifier=verifier, anchor=anchor, start_seq=max(first, 1), expect=expect
    )


def accept_foreign(result: VerifyResult, seqs: set[int]) -> tuple[VerifyResult, list[int]]:
    """Drop foreign records the operator has already investigated (`--accept-foreign`).

    Only `foreign` problems at exactly those sequences: a record that was injected
    once stays visible in the stream, but need not fail every later verify. A chain
    break, a wrong publisher or a checkpoint mismatch is never accepted this way.
    """
    accepted = sorted(p.seq for p in result.problems if p.code == "foreign" and p.seq in seqs)
    if not accepted:
        return result, []
    kept = tuple(p for p in result.problems if not (p.code == "foreign" and p.seq in seqs))
    return replace(result, problems=kept, problem_count=result.problem_count - len(accepted)), (
        accepted
    )


async def _verify(
    js: JetStreamContext,
    args: argparse.Namespace,
    verifier: LedgerVerifier,
    checkpoints: LoadedCheckpoints | None,
) -> int:
    result = await verify_ledger(js, args.stream, verifier=verifier, checkpoints=checkpoints)
    result, accepted = accept_foreign(result, set(args.accept_foreign))
    latest = checkpoints.latest if checkpoints else None
    if args.json:
        print(
            json.dumps(
                {
                    "ok": result.ok,
                    "checked": result.checked,
                    "first_seq": result.first_seq,
                    "last_seq": result.last_seq,
                    "head_seq": result.head_seq,
                    "head_hash": result.head_hash,
                    "checkpoint_seq": latest.seq if latest else None,
                    "accepted_foreign": accepted,
                    "broken_seq": result.broken.seq if result.broken else None,
                    "code": result.broken.code if result.broken else None,
                    "reason": result.broken.reason if result.broken else None,
                    "problems": [
                        {"seq": p.seq, "code": p.code, "reason": p.reason} for p in result.problems
                    ],
                }
            )
        )
    elif result.broken is None and result.last_seq == 0:
        print("ok: the ledger is empty (nothing appended yet, no checkpoint says otherwise)")
    elif result.broken is None:
        anchored = f"; checkpoint seq {latest.seq} found" if latest else ""
        if accepted:
            anchored += f"; accepted foreign record(s) at seq {', '.join(map(str, accepted))}"
        print(
            f"ok: {result.checked} records chained "
            f"(seq {result.first_seq}..{result.last_seq}), head {result.head_hash[:16]}{anchored}"
        )
    else:
        more = f"; {result.problem_count} problems in all" if result.problem_count > 1 else ""
        print(
            f"BROKEN at seq {result.broken.seq}: {result.broken.reason} "
            f"({result.checked} genuine records verified{more})"
        )
    return 0 if result.ok else 1


def _decode(raw: bytes) -> tuple[dict[str, Any], str | None]:
    """(event, record hash) from a ledger record, or (event, None) from a raw audit event."""
    record = parse_record(raw)
    if record is None:
        try:
            data = json.loads(raw)
        except ValueError:
            return {"type": "<unreadable>"}, None
        return (data if isinstance(data, dict) else {"type": "<unreadable>"}), None
    return record.event, record.hash


def _print(seq: int, raw: bytes, *, as_json: bool) -> None:
    event, digest = _decode(raw)
    if as_json:
        print(json.dumps({"seq": seq, "hash": digest, "event": event}, sort_keys=True))
        return
    ts = event.get("ts")
    when = (
        datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if isinstance(ts, int | float)
        else "?"
    )
    parts = [when, f"seq={seq}", str(event.get("type", "?"))]
    for name in ("actor", "outcome", "key_id", "key_version", "environment"):
        if event.get(name) is not None:
            parts.append(f"{name}={event[name]}")
    if digest:
        parts.append(f"hash={digest[:12]}")
    print("  ".join(parts), flush=True)


async def _tail(js: JetStreamContext, args: argparse.Namespace) -> int:
    info = await js.stream_info(args.stream)
    start = max(info.state.last_seq - max(args.lines, 0) + 1, info.state.first_seq, 1)
    if args.lines <= 0:
        start = info.state.last_seq + 1
    async for seq, raw in read_stream(js, args.stream, start_seq=start, follow=args.follow):
        _print(seq, raw, as_json=args.json)
    return 0


def _matches(event: dict[str, Any], args: argparse.Namespace, since: float) -> bool:
    ts = event.get("ts")
    if isinstance(ts, int | float) and ts < since:
        return False
    if args.type and not any(fnmatch.fnmatchcase(str(event.get("type")), t) for t in args.type):
        return False
    if args.key_id and event.get("key_id") != args.key_id:
        return False
    return not (args.outcome and event.get("outcome") != args.outcome)


async def _query(js: JetStreamContext, args: argparse.Namespace) -> int:
    since = parse_since(args.since)
    shown = 0
    async for seq, raw in read_stream(js, args.stream, start_time=since):
        event, _ = _decode(raw)
        if not _matches(event, args, since):
            continue
        _print(seq, raw, as_json=args.json)
        shown += 1
        if args.limit and shown >= args.limit:
            break
    return 0
