"""The HTTP/1.1 protocol both edges run: uvicorn's httptools protocol, with bounds.

What a hostile client can make a process hold is bounded here, before the app runs,
so token and proxy get the same limits:

- the request target: at most `max_url_bytes` (414 `url_too_long`);
- the request head: at most `max_header_count` fields and `max_header_bytes` bytes
  of them (431 `headers_too_large`), counted on the raw bytes before the parser
  sees them, so one endless header cannot grow a buffer either;
- the head must be complete `header_timeout_s` after its first byte (408
  `header_timeout`): a client trickling a head (slowloris) is cut;
- an answer the client does not read: once the transport's buffer is full (writing
  paused) for `write_timeout_s`, the connection is aborted and the app's `receive()`
  reports `http.disconnect`, so whatever the answer held (an upstream connection) is
  let go.

Every refusal is a JSON error, `Connection: close`, and nothing from the request is
echoed. The parser's own 400 (not valid HTTP) is JSON too.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from prometheus_client import Counter
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from shared.coalesce import CoalescedWrites
from shared.errors import error_body

__all__ = ["EDGE_REFUSALS", "EdgeProtocol", "JsonParseErrorProtocol", "ProtocolLimits"]

log = logging.getLogger(__name__)

EDGE_REFUSALS = Counter(
    "keyveil_http_edge_refusals_total",
    "Connections refused or cut by the HTTP protocol bounds, by reason",
    ["reason"],
)

# How long a refused connection keeps reading (and dropping) what the client still
# sends, so the error is read before the close instead of lost to a TCP reset.
_LINGER_S = 1.0
_HEAD_END = b"\r\n\r\n"


@dataclass(frozen=True)
class ProtocolLimits:
    """The bounds of one service's HTTP edge (see the module docstring)."""

    max_header_count: int = 100
    max_header_bytes: int = 32 * 1024
    max_url_bytes: int = 8 * 1024
    header_timeout_s: float = 10.0
    write_timeout_s: float = 30.0


class _RefusedError(Exception):
    """Raised inside a parser callback to stop parsing a refused request."""


def _json_error(status: int, code: str, message: str) -> bytes:
    body = orjson.dumps(error_body(code, message))
    return b"".join(
        [
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            b"connection: close\r\n",
            b"\r\n",
            body,
        ]
    )


class JsonParseErrorProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, whose parser-level 400 is a JSON error like ours.

    A request that is not valid HTTP (a CR, LF or NUL inside a header value, ...)
    never reaches the app; uvicorn answers it itself, by default in plain text.
    """

    _BODY = orjson.dumps(error_body("invalid_http", "the request is not valid HTTP"))

    def send_400_response(self, msg: str) -> None:
        content = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(self._BODY)).encode("ascii") + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
                self._BODY,
            ]
        )
        self.transport.write(b"".join(content))
        self.transport.close()


class EdgeProtocol(JsonParseErrorProtocol):
    """`JsonParseErrorProtocol` with the bounds of `limits`; see `bounded`."""

    limits: ClassVar[ProtocolLimits] = ProtocolLimits()

    @classmethod
    def bounded(cls, limits: ProtocolLimits) -> type[EdgeProtocol]:
        """A protocol class for uvicorn's `http=` with these limits."""
        return type("BoundedEdgeProtocol", (cls,), {"limits": limits})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._reset_head()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        # Every write of this connection (answers, refusals) goes through one buffer;
        # uvicorn's flow control keeps the real transport for pause/resume reading.
        self.transport = CoalescedWrites(self.transport, self.loop)  # type: ignore[assignment]

    def _reset_head(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._head_tail = b""
        self._line_seen = False
        self._line_bytes = 0
        self._header_count = 0
        self._header_bytes = 0
        self._url_bytes = 0

    # -- bytes in ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: dropped unread
        if self._in_head:
            if self._head_bytes == 0 and self._head_timer is None:
                self._head_timer = self.loop.call_later(
                    self.limits.header_timeout_s, self._head_too_slow
                )
            if self._count_head(data):
                return
        super().data_received(data)

    def _count_head(self, data: bytes) -> bool:
        """Count the raw head bytes in `data`; True when that refused the request."""
        joined = self._head_tail + data
        end = joined.find(_HEAD_END)
        in_head = len(data) if end < 0 else end + len(_HEAD_END) - len(self._head_tail)
        self._head_tail = joined[-3:]
        if not self._line_seen:
            newline = data.find(b"\n", 0, in_head)
            self._line_seen = newline >= 0
            self._line_bytes += newline if self._line_seen else in_head
        self._head_bytes += in_head
        if self._line_bytes > self.limits.max_url_bytes + 64:  # method and version besides
            self._refuse(414, "url_too_long", "the request target is too long")
            return True
        # Request line and headers together; each is checked on its own by the callbacks.
        if self._head_bytes > self.limits.max_url_bytes + self.limits.max_header_bytes + 64:
            self._refuse_headers()
            return True
        return False

    def _refuse_headers(self) -> None:
        self._refuse(431, "headers_too_large", "too many or too large request header fields")

    # -- parser callbacks --------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
        if self._url_bytes > self.limits.max_url_bytes:
            self._refuse(414, "url_too_long", "the request target is too long")
            raise _RefusedError
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value) + 4
        if (
            self._header_count > self.limits.max_header_count
            or self._header_bytes > self.limits.max_header_bytes
        ):
            self._refuse_headers()
            raise _RefusedError
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reset_head()

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # a callback refusal already answered
            super().send_400_response(msg)

    # -- time bounds -------------------------------------------------------------------

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self._refuse(408, "header_timeout", "the request head took too long")

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(
                self.limits.write_timeout_s, self._write_stalled
            )

    def resume_writing(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().resume_writing()

    def _write_stalled(self) -> None:
        self._write_timer = None
        EDGE_REFUSALS.labels("write_timeout").inc()
        log.warning(
            "client stopped reading; connection closed",
            extra={"fields": {"write_timeout_s": self.limits.write_timeout_s}},
        )
        self.transport.abort()  # close() would wait for the buffer the client never reads

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().connection_lost(exc)

    # -- refusing ----------------------------------------------------------------------

    def _refuse(self, status: int, code: str, message: str) -> None:
        if self._refused:
            return
        self._refused = True
        EDGE_REFUSALS.labels(code).inc()
        self._cancel_head_timer()
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.abort()  # mid-answer to an earlier request: no room for ours
            return
        self.transport.write(_json_error(status, code, message))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(_LINGER_S, self.transport.abort)
