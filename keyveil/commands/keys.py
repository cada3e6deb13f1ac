"""`keyveil keys add|list|show|rotate|revoke|rewrap|doctor|backup|restore`: via the key-manager.

A key is read from stdin (or a hidden prompt), never from argv, and leaves this process
only sealed to the key-manager's intake key. Listings never show a key: only id,
version, status, age, fingerprint and last four.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from keyveil.operator import operator_nats
from shared.bus import RemoteError
from shared.errors import BusError
from shared.keyadmin import BackupDocument, KeyAdminClient, KeyInfo

__all__ = ["register"]


def register(sub: Any) -> None:
    keys = sub.add_parser("keys", help="manage provider keys held by the key-manager")
    ops = keys.add_subparsers(dest="keys_command", required=True, metavar="OPERATION")

    add = ops.add_parser("add", help="store a new key (read from stdin or a prompt)")
    add.add_argument("--provider", default="openai")
    add.add_argument(
        "--environment", default="development", choices=("development", "staging", "production")
    )
    add.set_defaults(handler=_handler(_add))

    listing = ops.add_parser("list", help="list key versions (never the keys)")
    listing.add_argument("--provider")
    listing.add_argument("--environment")
    listing.add_argument("--all", action="store_true", help="include retired versions")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_handler(_list))

    show = ops.add_parser("show", help="every version of one key id")
    show.add_argument("key_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=_handler(_show))

    rotate = ops.add_parser("rotate", help="store a new version; the old one retires after grace")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace-seconds", type=int, default=None)
    rotate.set_defaults(handler=_handler(_rotate))

    revoke = ops.add_parser("revoke", help="stop a key (or one version) immediately")
    revoke.add_argument("key_id")
    revoke.add_argument("--version", type=int, default=None)
    revoke.set_defaults(handler=_handler(_revoke))

    rewrap = ops.add_parser("rewrap", help="re-wrap every data key under the current KEK")
    rewrap.set_defaults(handler=_handler(_rewrap))

    doctor = ops.add_parser("doctor", help="does the KEK open every record? what is wrong")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(handler=_handler(_doctor))

    backup = ops.add_parser("backup", help="write the encrypted records, signed, to FILE")
    backup.add_argument("file", type=Path)
    backup.set_defaults(handler=_handler(_backup))

    restore = ops.add_parser("restore", help="put back the records of a signed backup FILE")
    restore.add_argument("file", type=Path)
    restore.set_defaults(handler=_handler(_restore))


Operation = Callable[[KeyAdminClient, argparse.Namespace], Awaitable[int]]


def _handler(operation: Operation) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(_with_client(operation, args))
        except RemoteError as exc:
            print(f"keyveil keys: refused: {exc.reason}", file=sys.stderr)
            return 1
        except (BusError, OSError) as exc:
            print(f"keyveil keys: cannot reach the key-manager ({exc})", file=sys.stderr)
            return 3
        except ValidationError:
            raise  # keyveil.cli names the field and the rule, never the input
        except ValueError as exc:
            print(f"keyveil keys: {exc}", file=sys.stderr)
            return 2

    return run


async def _with_client(operation: Operation, args: argparse.Namespace) -> int:
    nc = await operator_nats(Path(args.state_dir))
    try:
        return await operation(KeyAdminClient(nc, actor="operator"), args)
    finally:
        await nc.drain()


def read_secret(prompt: str = "provider key: ") -> bytes:
    """The key from stdin when piped, else from a prompt that does not echo."""
    text = sys.stdin.readline() if not sys.stdin.isatty() else getpass.getpass(prompt)
    secret = text.strip()
    if not secret:
        raise ValueError("no key given on stdin")
    return secret.encode()


async def _add(client: KeyAdminClient, args: argparse.Namespace) -> int:
    info = await client.add(read_secret(), provider=args.provider, environment=args.environment)
    _print_table([info])
    return 0


async def _rotate(client: KeyAdminClient, args: argparse.Namespace) -> int:
    changed = await client.rotate(
        args.key_id, read_secret("new provider key: "), grace_s=args.grace_seconds
    )
    _print_table(changed)
    return 0


async def _revoke(client: KeyAdminClient, args: argparse.Namespace) -> int:
    changed = await client.revoke(args.key_id, version=args.version)
    if not changed:
        print("nothing to revoke")
    _print_table(changed)
    return 0


async def _rewrap(client: KeyAdminClient, args: argparse.Namespace) -> int:
    result = await client.rewrap()
    print(
        f"rewrapped {result.rewrapped}, already current {result.already_current}, "
        f"KEK {result.kek_id}"
    )
    for failed in result.failed:
        print(f"did not open: {failed}", file=sys.stderr)
    return 1 if result.failed else 0


async def _doctor(client: KeyAdminClient, args: argparse.Namespace) -> int:
    report = await client.doctor()
    if args.json:
        print(report.model_dump_json(indent=2))
        return 0 if report.ok else 1
    print(f"{'OK' if report.ok else 'PROBLEM'}: {report.reason}")
    print(
        f"KEK provider: {report.provider}"
        + (f" (previous: {report.previous_provider})" if report.previous_provider else "")
    )
    for name, value in sorted(report.details.items()):
        print(f"  {name}: {value}")
    print(f"records: {report.records}, not under the current KEK: {report.stale_records}")
    for line in report.unreadable:
        print(f"does not open: {line}", file=sys.stderr)
    return 0 if report.ok else 1


async def _backup(client: KeyAdminClient, args: argparse.Namespace) -> int:
    document = await client.backup()
    path: Path = args.file
    # Only envelopes and metadata, but still nobody else's business: owner-only.
    path.touch(mode=0o600, exist_ok=True)
    path.write_text(document.model_dump_json(indent=2) + "\n")
    print(f"backed up {len(document.records)} record(s) to {path} (signed by {document.signed_by})")
    return 0


async def _restore(client: KeyAdminClient, args: argparse.Namespace) -> int:
    try:
        document = BackupDocument.model_validate_json(Path(args.file).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{args.file} is not a keyveil keys backup ({type(exc).__name__})"
        ) from None
    result = await client.restore(document)
    print(f"restored {result.restored}, already present {result.already_present}")
    for label in result.conflicts:
        print(f"kept as found (differs from the backup): {label}", file=sys.stderr)
    for label in result.unreadable:
        print(f"restored but does not open: {label}", file=sys.stderr)
    return 1 if result.conflicts or result.unreadable else 0


async def _list(client: KeyAdminClient, args: argparse.Namespace) -> int:
    infos = await client.list_keys(
        provider=args.provider, environment=args.environment, include_retired=args.all
    )
    _print(infos, as_json=args.json)
    return 0


async def _show(client: KeyAdminClient, args: argparse.Namespace) -> int:
    _print(await client.show(args.key_id), as_json=args.json)
    return 0


def _print(infos: list[KeyInfo], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps([i.model_dump(mode="json") for i in infos], indent=2))
    else:
        _print_table(infos)


def _age(seconds: float) -> str:
    if seconds >= 86_400:
        return f"{seconds / 86_400:.1f}d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 60:.0f}m"


def _print_table(infos: list[KeyInfo]) -> None:
    if not infos:
        print("no keys matched")
        return
    now = time.time()
    rows = [("KEY ID", "VER", "PROVIDER", "ENV", "STATUS", "AGE", "FINGERPRINT", "LAST4")]
    rows += [
        (
            i.key_id,
            str(i.version),
            i.provider,
            i.environment,
            i.status.value,
            _age(i.age_s(now)),
            i.fingerprint,
            i.last4,
        )
        for i in infos
    ]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
