"""A local, append-only outbox of events not yet acknowledged by JetStream.

Why: an event sits in the publisher's memory for a moment after the request that caused
it was answered; a process killed (kill -9, OOM) in that moment lost it. Here each
event is written as one line (`<subject> <msg id> <json>`) to a segment file before the
answer's last byte is sent, and forgotten when JetStream acknowledges it.

- One `write()` per event, no fsync: a killed process keeps its page cache, so the line
  survives kill -9 and container restarts (a k8s emptyDir lives as long as the pod). A
  machine crash can lose the last seconds of lines: out of scope, as for any page cache.
- Segments: a process appends to its live segment, emptied (truncated) whenever all its
  events are settled (acknowledged, or dropped by the publisher's bounded buffer); while
  acks do not come it grows, and past `segment_bytes` a new one is started. A sealed
  segment whose every event was settled is deleted. Disk use is bounded by the events
  the publisher still holds plus one segment.
- Ownership: a process holds an exclusive `flock` on every segment it writes or replays.
  The kernel releases it when the process dies, so at start-up a segment whose lock can
  be taken belongs to a dead process: it is claimed and its events replayed with their
  original Msg-Id. A replayed event JetStream already stored (acknowledged since the
  last truncation) is dropped by the stream within its duplicate window (2 minutes);
  replayed later, it is stored twice with one event id, and the auditor's consumer skips
  the copy (it remembers the last AUDITOR_DEDUPE_WINDOW ids): readers count by event id.
- The directory is private (0700, ours): lines in it are published as they are.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
from prometheus_client import Counter

from shared.errors import ConfigError

__all__ = ["Outbox", "Replayed", "Segment"]

log = logging.getLogger(__name__)

OUTBOX_ERRORS = Counter(
    "keyveil_events_outbox_errors_total",
    "Events that could not be written to the local outbox (disk full, read-only)",
)
OUTBOX_REPLAYED = Counter(
    "keyveil_events_outbox_replayed_total",
    "Events replayed at start-up from the outbox of a process that died",
)

_SUFFIX = ".outbox"
DEFAULT_SEGMENT_BYTES = 4 * 1024 * 1024


class Segment:
    """One outbox file: its events not yet settled, and whether it still grows."""

    __slots__ = ("fd", "path", "sealed", "size", "unsettled")

    def __init__(self, path: Path, fd: int, size: int = 0) -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.unsettled = 0
        self.sealed = False


@dataclass(frozen=True, slots=True)
class Replayed:
    """An event read back from a dead process's segment."""

    subject: str
    msg_id: str
    payload: bytes
    segment: Segment


def _private_directory(directory: Path) -> None:
    """Create `directory` 0700, or refuse one that someone else could write into."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
    except OSError as exc:
        raise ConfigError(
            [(str(directory), f"outbox directory unusable ({exc.strerror})")]
        ) from None
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        rule = "outbox directory must be owned by this user and not group/world-writable"
        raise ConfigError([(str(directory), rule)])


class Outbox:
    """The segment files of one process in `directory` (see the module docstring)."""

    def __init__(self, directory: Path, *, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> None:
        _private_directory(directory)
        self.directory = directory
        self._segment_bytes = segment_bytes
        self._name = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._count = 0
        self._current: Segment | None = None
        self._held: set[Segment] = set()  # every segment whose lock we hold
        self._failing = False

    # -- writing ------------------------------------------------------------------------

    def append(self, subject: str, msg_id: str, payload: bytes) -> Segment | None:
        """Write one event line; its segment (settle it once acked), None if not written.

        Never raises: an outbox that cannot be written costs durability, not the request.
        """
        try:
            segment = self._current
            if segment is None or segment.size >= self._segment_bytes:
                segment = self._rotate()
            line = b"%s %s %s\n" % (subject.encode(), msg_id.encode(), payload)
            if os.write(segment.fd, line) != len(line):  # the disk filled mid-line
                raise OSError(errno.ENOSPC, "short write")
        except OSError as exc:
            OUTBOX_ERRORS.inc()
            if not self._failing:
                log.warning("event outbox not writable (%s): events are kept in memory only",
                            exc.strerror)  # fmt: skip
                self._failing = True
            return None
        self._failing = False
        segment.size += len(line)
        segment.unsettled += 1
        return segment

    def _rotate(self) -> Segment:
        if self._current is not None:
            self._current.sealed = True
            self._forget_if_done(self._current)
        self._count += 1
        final = self.directory / f"{self._name}-{self._count}{_SUFFIX}"
        # Locked before it gets its final name, so no starting process can claim it.
        temporary = final.with_suffix(".new")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(temporary, final)
        self._current = Segment(final, fd)
        self._held.add(self._current)
        return self._current

    def settle(self, segment: Segment) -> None:
        """One event of `segment` needs no replay any more (acknowledged or dropped)."""
        segment.unsettled -= 1
        if segment is self._current and segment.unsettled <= 0 and segment.size:
            # Everything in the live segment is acknowledged: emptied (one syscall), so a
            # successor replays almost nothing JetStream already has.
            try:
                os.ftruncate(segment.fd, 0)
                segment.size = 0
            except OSError:
                OUTBOX_ERRORS.inc()
        else:
            self._forget_if_done(segment)

    def _forget_if_done(self, segment: Segment) -> None:
        if segment.sealed and segment.unsettled <= 0 and segment.fd >= 0:
            # Deleted before the lock goes: nobody can claim a finished segment.
            with contextlib.suppress(FileNotFoundError):
                segment.path.unlink()
            os.close(segment.fd)
            segment.fd = -1
            self._held.discard(segment)

    def close(self) -> None:
        """Stop writing: finished segments go, unsettled ones stay for the next start."""
        self._current = None
        for segment in list(self._held):
            segment.sealed = True
            self._forget_if_done(segment)
            if segment.fd >= 0:
                os.close(segment.fd)  # unlocked: the next process replays its lines
                segment.fd = -1
        self._held.clear()

    # -- replaying ----------------------------------------------------------------------

    def claim_orphans(self, limit: int) -> list[Replayed]:
        """The events of segments whose process died (at most `limit`, oldest first)."""
        for leftover in self.directory.glob("*.new"):  # died between creating and naming it
            segment = self._claim(leftover)
            if segment is not None:
                segment.sealed = True
                self._forget_if_done(segment)
        replayed: list[Replayed] = []
        for path in sorted(self.directory.glob(f"*{_SUFFIX}"), key=_mtime):
            if len(replayed) >= limit:
                break
            segment = self._claim(path)
            if segment is None:
                continue
            events = list(_read_lines(path, segment, limit - len(replayed)))
            segment.unsettled = len(events)
            segment.sealed = True
            replayed.extend(events)
            self._forget_if_done(segment)
        if replayed:
            OUTBOX_REPLAYED.inc(len(replayed))
            log.warning("replaying %d events from the outbox of a process that died",
                        len(replayed))  # fmt: skip
        return replayed

    def _claim(self, path: Path) -> Segment | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Finished and deleted by its owner between our open and our lock: not an orphan.
            if os.fstat(fd).st_ino != path.stat().st_ino:
                raise FileNotFoundError(path)
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            return None
        segment = Segment(path, fd, size=os.fstat(fd).st_size)
        self._held.add(segment)
        return segment


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _is_event(msg_id: bytes, payload: bytes) -> bool:
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False
    return isinstance(event, dict) and event.get("event_id") == msg_id.decode(errors="replace")


def _read_lines(path: Path, segment: Segment, limit: int) -> Iterator[Replayed]:
    skipped = 0
    with path.open("rb") as lines:  # a second descriptor: the claimed one holds the lock
        for count, line in enumerate(lines):
            if count >= limit:
                log.warning("outbox %s: more than %d events; the rest dropped", path.name, limit)
                return
            parts = line.rstrip(b"\n").split(b" ", 2)
            # A line cut short (the disk filled mid-write) has no newline, or runs into the
            # next one: only a whole event whose id is the line's is replayed.
            if len(parts) != 3 or not line.endswith(b"\n") or not _is_event(parts[1], parts[2]):
                skipped += 1
                continue
            yield Replayed(parts[0].decode(), parts[1].decode(), parts[2], segment)
    if skipped:
        log.warning("outbox %s: %d unreadable lines skipped", path.name, skipped)
