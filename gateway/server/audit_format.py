"""The audit trail's file format: JSON Lines records sealed into a hash chain.

Pure functions, no EG imports: the gateway writes with them and ``kernelfleet audit``
reads and verifies with them, so the format is defined once (see docs/compliance.md).

A record is one line::

    {"seq":7,"time":"2026-11-22T10:15:00.123456Z","event":"execute",...,"prev":"<hex>","hash":"<hex>"}

``hash`` is the SHA-256 of the exact bytes of the line without its ``,"hash":"..."`` part
(the *body*, which ends with ``"prev":...}``); ``prev`` is the previous record's hash
(:data:`GENESIS` for the first record ever). Editing a record breaks its own hash;
deleting one breaks the next record's ``prev`` and its ``seq`` sequence. Hashing exact
bytes means no JSON canonicalisation is needed to verify, in any language.

Files: ``audit.jsonl`` is the current file; rotated files are ``audit.<first seq>.jsonl``
(12 digits, so names sort in chain order); ``audit.jsonl.head`` holds the last sealed seq
and hash, so cutting records off the end is noticed too.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
HEAD_SUFFIX = ".head"
_SEALED_RE = re.compile(r'^(\{.*),"hash":"([0-9a-f]{64})"\}$')
_SEQ_DIGITS = 12


def utc_timestamp(unix_s: float) -> str:
    """``2026-11-22T10:15:00.123456Z`` for a Unix time."""
    moment = datetime.fromtimestamp(unix_s, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_timestamp(value: str) -> float:
    """The Unix time of a record's ``time`` field (ValueError if it is not one)."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def seal(record: Mapping[str, Any], *, seq: int, prev: str) -> tuple[bytes, str]:
    """The line (with its newline) and hash for ``record`` as number ``seq`` after ``prev``.

    ``seq`` goes first and ``prev`` last; the record's own keys keep their order.
    """
    fields = {"seq": seq, **{k: v for k, v in record.items() if k not in ("seq", "prev", "hash")}}
    fields["prev"] = prev
    body = json.dumps(fields, ensure_ascii=False, separators=(",", ":"), default=str)
    digest = hashlib.sha256(body.encode()).hexdigest()
    line = f'{body[:-1]},"hash":"{digest}"}}\n'
    return line.encode(), digest


@dataclass(frozen=True)
class Sealed:
    """One line read back: its record (without ``hash``), stated hash, and whether it holds."""

    record: dict[str, Any]
    hash: str
    intact: bool

    @property
    def seq(self) -> int:
        return int(self.record["seq"])

    @property
    def prev(self) -> str:
        return str(self.record["prev"])


def unseal(line: str) -> Sealed:
    """Parse one line; ValueError if it is not a sealed record at all."""
    match = _SEALED_RE.match(line.rstrip("\n"))
    if not match:
        raise ValueError("not a sealed audit record (no trailing hash)")
    body, stated = match.group(1) + "}", match.group(2)
    record = json.loads(body)
    if not isinstance(record, dict) or not isinstance(record.get("seq"), int):
        raise ValueError("not a sealed audit record (no seq)")
    if not isinstance(record.get("prev"), str):
        raise ValueError("not a sealed audit record (no prev)")
    intact = hashlib.sha256(body.encode()).hexdigest() == stated
    return Sealed(record, stated, intact)


# -- files ---------------------------------------------------------------------------------


def rotated_name(current: Path, first_seq: int) -> Path:
    """Where ``current`` goes when rotated: ``audit.000000000001.jsonl``."""
    return current.with_name(f"{current.stem}.{first_seq:0{_SEQ_DIGITS}d}{current.suffix}")


def head_path(current: Path) -> Path:
    """``audit.jsonl.head``: the last seq and hash the writer sealed."""
    return current.with_name(current.name + HEAD_SUFFIX)


def chain_files(current: Path) -> list[Path]:
    """Every file of the chain that exists, oldest first (rotated ones, then ``current``)."""
    pattern = re.compile(
        rf"^{re.escape(current.stem)}\.\d{{{_SEQ_DIGITS}}}{re.escape(current.suffix)}$"
    )
    folder = current.parent
    if not folder.is_dir():
        return []
    rotated = sorted(p for p in folder.iterdir() if pattern.match(p.name))
    return rotated + ([current] if current.exists() else [])


def read_lines(files: Iterable[Path]) -> Iterator[tuple[Path, int, str]]:
    """``(file, line number from 1, text)`` for every line of ``files`` in order."""
    for path in files:
        with path.open(encoding="utf-8", errors="replace") as handle:
            for number, text in enumerate(handle, start=1):
                yield path, number, text


def read_records(current: Path) -> Iterator[dict[str, Any]]:
    """The records of the whole chain, oldest first; unreadable lines are skipped."""
    for _, _, text in read_lines(chain_files(current)):
        try:
            yield unseal(text).record
        except ValueError:
            continue


def read_head(current: Path) -> tuple[int, str] | None:
    """``(seq, hash)`` from the head file, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads(head_path(current).read_text())
        return int(data["seq"]), str(data["hash"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -- verification ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """The first bad record: where it is and what is wrong with it."""

    file: Path
    line: int
    seq: int | None
    reason: str

    def describe(self) -> str:
        seq = f" (seq {self.seq})" if self.seq is not None else ""
        return f"{self.file}:{self.line}{seq}: {self.reason}"


@dataclass
class Verification:
    """What ``verify_chain`` found: the records checked, and the first problem if any."""

    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    files: list[Path] = field(default_factory=list)
    problem: Problem | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass
class _Last:
    path: Path
    line: int
    sealed: Sealed


_EDITED = "edited: its hash does not match its content"


def verify_chain(current: Path) -> Verification:
    """Check every record of the chain ending in ``current``; stop at the first bad one."""
    result = Verification(files=chain_files(current))
    last: _Last | None = None
    for path, number, text in read_lines(result.files):
        try:
            sealed = unseal(text)
        except ValueError as e:
            result.problem = Problem(path, number, None, f"unreadable record: {e}")
            return result
        if last is None:
            reason = _first_problem(sealed, result)
            blame_previous = False
        else:
            reason, blame_previous = _link_problem(last.sealed, sealed)
        if reason:
            where = (
                (last.path, last.line, last.sealed.seq)
                if blame_previous and last
                else (path, number, sealed.seq)
            )
            result.problem = Problem(*where, reason)
            return result
        last = _Last(path, number, sealed)
        result.records += 1
        result.first_seq = sealed.seq if result.first_seq is None else result.first_seq
        result.last_seq = sealed.seq
    _check_head(current, last, result)
    return result


def _first_problem(sealed: Sealed, result: Verification) -> str:
    if not sealed.intact:
        return _EDITED
    if sealed.seq != 1:
        result.notes.append(f"the chain starts at seq {sealed.seq}: older files are not here")
    elif sealed.prev != GENESIS:
        return "edited: the first record must follow the genesis hash"
    return ""


def _link_problem(before: Sealed, sealed: Sealed) -> tuple[str, bool]:
    """Why ``sealed`` cannot follow ``before`` ('' if it can); True if ``before`` is to blame."""
    if not sealed.intact:
        return _EDITED, False
    if sealed.seq == before.seq + 1 and sealed.prev == before.hash:
        return "", False
    if sealed.seq > before.seq + 1:
        first, last = before.seq + 1, sealed.seq - 1
        missing = f"seq {first}" if first == last else f"seqs {first} to {last}"
        return f"deleted: {missing} missing right before this record", False
    if sealed.seq == before.seq + 1:
        # The record before was edited and re-hashed; the next one still names the old hash.
        reason = (
            f"edited: content and hash were rewritten (seq {sealed.seq} was sealed after a "
            "different record)"
        )
        return reason, True
    return f"out of order: seq {sealed.seq} follows seq {before.seq}", False


def _check_head(current: Path, last: _Last | None, result: Verification) -> None:
    head = read_head(current)
    if head is None:
        if last is not None:
            result.notes.append("no head file: records cut off the end would go unnoticed")
        return
    seq, digest = head
    if last is None:
        if seq > 0:
            result.problem = Problem(current, 0, seq, f"deleted: every record up to seq {seq}")
        return
    if seq > last.sealed.seq:
        result.problem = Problem(
            last.path,
            last.line + 1,
            last.sealed.seq + 1,
            f"deleted: seqs {last.sealed.seq + 1} to {seq} missing at the end (head says {seq})",
        )
    elif seq == last.sealed.seq and digest != last.sealed.hash:
        result.problem = Problem(
            last.path, last.line, seq, "edited: the last record differs from the head's hash"
        )
