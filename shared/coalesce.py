"""Writes made in one event-loop iteration, sent as one.

uvloop sends every `transport.write()` at once: a syscall (and, on loopback, the
receiver's TCP work) per call. An HTTP answer written as head then body, or several
requests' Redis scripts written in the same iteration, are each one write here: small
writes wait until the end of the current iteration (a `call_soon`), a large write, a
close or an EOF sends what waits first, so order is kept and nothing is held longer.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["CoalescedWrites"]


class CoalescedWrites:
    """A transport whose small writes of one loop iteration leave in one write."""

    __slots__ = ("_loop", "_pending", "_transport")
    _DIRECT = 64 * 1024  # larger writes go straight out (no copy into a joined buffer)

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) >= self._DIRECT:
            self.flush()
            self._transport.write(data)
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))

    def flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        self._pending = []
        if self._transport.is_closing():
            return
        self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
