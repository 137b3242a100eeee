"""The audit chain on disk: one append-only JSON Lines file, rotated by size, one writer.

:class:`ChainFile` is synchronous on purpose: :class:`~gateway.server.audit_sink.AuditSink`
calls it from a worker thread so that disk latency never blocks EG's event loop. Format and
file names are in :mod:`gateway.server.audit_format`.

- Only one process may write a chain: ``audit.jsonl.lock`` is held (``flock``) for life.
- On open the chain continues from the last sealed record found on disk.
- A batch is written with one ``write``; if that fails the file is cut back to where it
  was, so a failed batch leaves no half line, and the seq and hash do not advance.
- If ``audit.jsonl`` is moved away or replaced (log rotation by hand, a remount), the next
  batch reopens the path instead of writing into the old file.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .audit_format import (
    GENESIS,
    chain_files,
    head_path,
    rotated_name,
    seal,
    unseal,
)

_TAIL_BYTES = 256 * 1024


class AuditFileError(Exception):
    """The audit file cannot be used at all (start-up): which file and why."""


class ChainFile:
    """Appends sealed records to ``path`` (see module docstring)."""

    def __init__(self, path: Path, *, rotate_bytes: int, fsync: bool = False) -> None:
        self.path = path
        self.rotate_bytes = rotate_bytes
        self.fsync = fsync
        self.seq = 0
        self.last_hash = GENESIS
        self._fd: int | None = None
        self._first_seq = 1
        self._lock_fd = self._lock()
        self._recover()

    # -- start-up ----------------------------------------------------------------------------

    def _lock(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock_path = self.path.with_name(self.path.name + ".lock")
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise AuditFileError(f"cannot create {self.path.parent}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise AuditFileError(
                f"{self.path} is being written by another process (lock {lock_path} is held)"
            ) from e
        return fd

    def _recover(self) -> None:
        """Continue the chain from the newest sealed record on disk."""
        # Only regular files: reading a device (a path pointing at /dev/full) never ends.
        for path in reversed([p for p in chain_files(self.path) if p.is_file()]):
            last = _last_sealed(path)
            if last is not None:
                self.seq, self.last_hash = last.seq, last.hash
                break
        first = _first_sealed(self.path) if self.path.is_file() else None
        self._first_seq = first.seq if first is not None else self.seq + 1

    # -- writing -----------------------------------------------------------------------------

    def append(self, records: Sequence[Mapping[str, Any]]) -> list[bytes]:
        """Seal and write ``records`` in one write; return their lines. OSError on failure."""
        seq, prev, lines = self.seq, self.last_hash, []
        for record in records:
            seq += 1
            line, prev = seal(record, seq=seq, prev=prev)
            lines.append(line)
        fd = self._open()
        start = os.lseek(fd, 0, os.SEEK_END)
        if start and not _ends_with_newline(fd, start):
            lines[0] = b"\n" + lines[0]  # a crash left half a line: never glue onto it
        try:
            _write_all(fd, b"".join(lines))
            if self.fsync:
                os.fsync(fd)
        except OSError:
            self._cut_back(fd, start)
            raise
        if start == 0:
            self._first_seq = self.seq + 1
        self.seq, self.last_hash = seq, prev
        self._write_head()
        if os.fstat(fd).st_size >= self.rotate_bytes:
            self._rotate()
        return lines

    def _open(self) -> int:
        if self._fd is not None and not self._moved_away(self._fd):
            return self._fd
        self._close_file()
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        return self._fd

    def _moved_away(self, fd: int) -> bool:
        try:
            on_disk = os.stat(self.path)
        except OSError:
            return True
        mine = os.fstat(fd)
        return (on_disk.st_dev, on_disk.st_ino) != (mine.st_dev, mine.st_ino)

    def _cut_back(self, fd: int, size: int) -> None:
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass  # the verifier will name the half line
        self._close_file()  # reopen on the next try: the path may point elsewhere by then

    def _write_head(self) -> None:
        head = head_path(self.path)
        tmp = head.with_name(head.name + ".tmp")
        data = json.dumps({"seq": self.seq, "hash": self.last_hash, "file": self.path.name})
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, data.encode() + b"\n")
        finally:
            os.close(fd)
        os.replace(tmp, head)

    def _rotate(self) -> None:
        self._close_file()
        os.replace(self.path, rotated_name(self.path, self._first_seq))
        self._first_seq = self.seq + 1

    def _close_file(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def close(self) -> None:
        """Close the file and give the lock back (again: nothing)."""
        self._close_file()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _ends_with_newline(fd: int, size: int) -> bool:
    return os.pread(fd, 1, size - 1) == b"\n"


def _last_sealed(path: Path) -> Any:
    """The last line of ``path`` that is a sealed record (None if none in its tail)."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - _TAIL_BYTES))
            tail = handle.read()
    except OSError as e:
        raise AuditFileError(f"cannot read {path}: {e.strerror}") from e
    for raw in reversed(tail.splitlines()):
        try:
            return unseal(raw.decode("utf-8", errors="replace"))
        except ValueError:
            continue
    return None


def _first_sealed(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            return unseal(handle.readline())
    except (OSError, ValueError):
        return None
