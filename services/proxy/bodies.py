"""Request bodies: read under a size cap, hashed as they arrive, checked before use.

JSON bodies are small and held in memory. Uploads (speech to text) are spooled to a
temporary file past 1 MiB, so a 25 MB upload never sits whole in memory, and they go
upstream only after the digest matched and the form was seen to carry a file: a
tampered or malformed upload never reaches the provider.

Bounds against clients that hold or flood: every body is read with an idle timeout
between chunks and an overall deadline (`read_chunks`, 408), and the uploads in flight
in one process share a byte budget (`SpoolBudget`, 503 before any byte is read), so
the spool directory cannot be filled.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
from python_multipart.multipart import MultipartParser, parse_options_header

from shared.errors import (
    ApiError,
    BadRequestError,
    PayloadTooLargeError,
    RequestTimeoutError,
    UnavailableError,
)
from shared.signing import ExpectedDigest

__all__ = [
    "BodyTimeoutError",
    "ClientGoneError",
    "JsonBody",
    "SpoolBudget",
    "UnsupportedMediaTypeError",
    "Upload",
    "read_chunks",
    "read_json",
    "spool_multipart",
]

_SPOOL_IN_MEMORY = 1024 * 1024
_UPLOAD_CHUNK = 256 * 1024


class UnsupportedMediaTypeError(ApiError):
    status = 415
    default_code = "unsupported_media_type"


class BodyTimeoutError(RequestTimeoutError):
    """The proxy's request body was held too long (idle, or past its deadline)."""


class ClientGoneError(Exception):
    """The client disconnected while its request body was being read."""


async def read_chunks(
    receive: Callable[[], Awaitable[Any]], *, idle_s: float, total_s: float
) -> AsyncIterator[bytes]:
    """The request body as it arrives (raw ASGI), or 408 when the client holds it.

    `idle_s` bounds the wait for each chunk, `total_s` the whole body: a client that
    stops sending, or trickles a byte now and then, is answered and let go.
    """
    deadline = time.monotonic() + total_s
    while True:
        wait = min(idle_s, deadline - time.monotonic())
        try:
            if wait <= 0:
                raise TimeoutError
            async with asyncio.timeout(wait):
                message = await receive()
        except TimeoutError:
            raise BodyTimeoutError(
                "the request body did not arrive in time",
                headers={"Connection": "close"},
            ) from None
        if message["type"] == "http.disconnect":
            raise ClientGoneError
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


class SpoolBudget:
    """Bytes of uploads in flight in this process, against a fixed budget.

    A reservation is taken before the body is read, for its declared length (or the
    size cap when none is declared), and returned when the upload is closed.
    """

    def __init__(self, budget_bytes: int, *, retry_after_s: int = 2) -> None:
        self.budget_bytes = budget_bytes
        self.in_use = 0
        self._retry_after = str(retry_after_s)

    def reserve(self, *, content_length: str | None, limit: int) -> int:
        """Reserve room for one upload (returned by `release`), or 503 `upload_capacity`."""
        wanted = limit
        if content_length is not None and content_length.isdigit():
            wanted = min(int(content_length), limit)
        if self.in_use + wanted > self.budget_bytes:
            raise UnavailableError(
                "too many uploads in progress; try again shortly",
                code="upload_capacity",
                headers={"Retry-After": self._retry_after},
            )
        self.in_use += wanted
        return wanted

    def release(self, reserved: int) -> None:
        self.in_use = max(0, self.in_use - reserved)


def _check_declared_length(content_length: str | None, limit: int) -> None:
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise PayloadTooLargeError(f"body exceeds {limit} bytes")


@dataclass(frozen=True)
class JsonBody:
    raw: bytes
    payload: dict[str, Any]

    @property
    def model(self) -> str | None:
        model = self.payload.get("model")
        return model if isinstance(model, str) else None


async def read_json(
    chunks: AsyncIterator[bytes],
    *,
    content_type: str | None,
    content_length: str | None,
    digest: ExpectedDigest,
    limit: int,
) -> JsonBody:
    if content_type is None or not content_type.lower().startswith("application/json"):
        raise UnsupportedMediaTypeError("Content-Type must be application/json")
    _check_declared_length(content_length, limit)
    hasher = digest.new_hasher()
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"body exceeds {limit} bytes")
        hasher.update(chunk)
        parts.append(chunk)
    digest.check(hasher.digest())
    raw = b"".join(parts)
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequestError("body is not valid JSON", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequestError("body must be a JSON object", code="invalid_json")
    return JsonBody(raw, payload)


class PartReader:
    """Follows a multipart body part by part: collects each part's Content-Disposition and
    hands its options to `part_named`; subclasses decide what to keep of the part data."""

    def __init__(self) -> None:
        self._field = bytearray()
        self._value = bytearray()
        self._disposition = b""

    def parser(self, boundary: bytes) -> MultipartParser:
        """A python-multipart parser that calls this reader back."""
        return MultipartParser(
            boundary,
            {
                "on_part_begin": self.on_part_begin,
                "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value,
                "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished,
                "on_part_data": self.on_part_data,
            },
        )

    def on_part_begin(self) -> None:
        self._disposition = b""
        self.part_begins()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        if bytes(self._field).lower() == b"content-disposition":
            self._disposition = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self.part_named(options)

    def part_begins(self) -> None:
        """A new part starts (before its headers)."""

    def part_named(self, options: dict[bytes, bytes]) -> None:
        """The part's Content-Disposition options are known (`name`, `filename`)."""

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        """A piece of the current part's data."""


class _FormScan(PartReader):
    """Names the multipart parts as they stream past (no part data is kept)."""

    def __init__(self) -> None:
        super().__init__()
        self.has_file = False
        self.model: bytearray | None = None
        self.in_model = False

    def part_begins(self) -> None:
        self.in_model = False

    def part_named(self, options: dict[bytes, bytes]) -> None:
        name = options.get(b"name")
        if name == b"file" and b"filename" in options:
            self.has_file = True
        elif name == b"model":
            self.model = bytearray()
            self.in_model = True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.in_model and self.model is not None and len(self.model) < 256:
            self.model += data[start:end]


@dataclass
class Upload:
    """A spooled multipart body, ready to stream upstream."""

    file: IO[bytes]
    size: int
    content_type: str
    model: str | None

    async def stream(self) -> AsyncIterator[bytes]:
        self.file.seek(0)
        while chunk := self.file.read(_UPLOAD_CHUNK):
            yield chunk

    def close(self) -> None:
        self.file.close()


async def spool_multipart(
    chunks: AsyncIterator[bytes],
    *,
    content_type: str | None,
    content_length: str | None,
    digest: ExpectedDigest,
    limit: int,
    spool_dir: Path | None = None,
) -> Upload:
    kind, options = parse_options_header(content_type or "")
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise UnsupportedMediaTypeError("Content-Type must be multipart/form-data with a boundary")
    _check_declared_length(content_length, limit)
    scan = _FormScan()
    parser = scan.parser(boundary)
    hasher = digest.new_hasher()
    spool = tempfile.SpooledTemporaryFile(  # noqa: SIM115 - closed by Upload
        max_size=_SPOOL_IN_MEMORY, dir=str(spool_dir) if spool_dir else None
    )
    size = 0
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(f"body exceeds {limit} bytes")
            hasher.update(chunk)
            spool.write(chunk)
            try:
                parser.write(chunk)
            except Exception:  # python-multipart raises its own and ValueErrors
                raise BadRequestError(
                    "malformed multipart body", code="invalid_multipart"
                ) from None
        digest.check(hasher.digest())
        if not scan.has_file:
            raise BadRequestError("the form needs a file part", code="file_missing")
        if not scan.model:
            raise BadRequestError("the form needs a model field", code="model_missing")
    except BaseException:
        spool.close()
        raise
    return Upload(
        file=spool,
        size=size,
        content_type=content_type or "",
        model=bytes(scan.model).decode("utf-8", "replace").strip(),
    )
