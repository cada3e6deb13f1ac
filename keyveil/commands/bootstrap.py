"""`keyveil bootstrap`: create every JetStream stream at deploy time, or check them.

Run by the operator with the `bootstrap` NATS login (NATS_USER=bootstrap), which no
service holds: services may publish to and read their streams but never create, update
or delete one (shared/streams.py). `--check` only compares and exits 1 on any drift.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors

from keyveil.operator import operator_nats
from shared.streams import STREAMS, bootstrap_streams, check_streams

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bootstrap", help="create the JetStream streams (deploy time), or --check them"
    )
    parser.add_argument(
        "--replicas", type=int, default=1, help="stream replicas (JETSTREAM_REPLICAS; 1)"
    )
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on drift")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.replicas <= 5:
        print("keyveil bootstrap: --replicas must be 1 to 5", file=sys.stderr)
        return 2
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    try:
        nc = await operator_nats(
            Path(args.state_dir), role="operator" if args.check else "bootstrap"
        )
    except (OSError, nats.errors.Error) as exc:
        print(f"keyveil bootstrap: cannot reach NATS ({type(exc).__name__})", file=sys.stderr)
        return 3
    try:
        js = nc.jetstream(timeout=5)
        if args.check:
            drifts = await check_streams(
                js, [s.name or "" for s in STREAMS], replicas=args.replicas
            )
            for drift in drifts:
                print(f"drift: {drift.describe()}")
            if not drifts:
                print(f"ok: {len(STREAMS)} streams as defined")
            return 1 if drifts else 0
        for line in await bootstrap_streams(js, replicas=args.replicas):
            print(line)
        return 0
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        print(f"keyveil bootstrap: JetStream refused ({type(exc).__name__})", file=sys.stderr)
        return 1
    finally:
        await nc.close()
