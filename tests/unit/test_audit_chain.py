"""The audit chain on disk: sealing, appending, rotation, and `kernelfleet audit verify`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.server.audit_file import AuditFileError, ChainFile
from gateway.server.audit_format import (
    GENESIS,
    chain_files,
    read_records,
    seal,
    unseal,
    verify_chain,
)
from kernelfleet.cli import main


def _records(n: int, start: int = 0) -> list[dict]:
    return [
        {"time": f"2026-11-22T10:00:{i:02d}.000000Z", "event": "execute", "user": "alice",
         "code": f"print({i}) # ünïcode"}
        for i in range(start, start + n)
    ]  # fmt: skip


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[ChainFile]:
    chain = ChainFile(tmp_path / "audit" / "audit.jsonl", rotate_bytes=10**9)
    yield chain
    chain.close()


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_a_sealed_line_hashes_its_exact_bytes_and_names_the_previous_hash() -> None:
    line, digest = seal({"event": "x", "code": "ü"}, seq=1, prev=GENESIS)
    sealed = unseal(line.decode())
    assert sealed.intact and sealed.hash == digest and sealed.seq == 1 and sealed.prev == GENESIS
    assert list(sealed.record) == ["seq", "event", "code", "prev"]
    tampered = line.decode().replace('"x"', '"y"')
    assert not unseal(tampered).intact
    with pytest.raises(ValueError):
        unseal('{"seq": 1}')


def test_appends_continue_one_chain_across_processes(chain: ChainFile, tmp_path: Path) -> None:
    chain.append(_records(3))
    chain.close()
    again = ChainFile(chain.path, rotate_bytes=10**9)
    again.append(_records(2, start=3))
    again.close()
    seqs = [r["seq"] for r in read_records(chain.path)]
    assert seqs == [1, 2, 3, 4, 5]
    result = verify_chain(chain.path)
    assert result.ok and result.records == 5 and result.notes == []
    assert oct(chain.path.stat().st_mode & 0o777) == "0o600"
    assert oct(chain.path.parent.stat().st_mode & 0o777) == "0o700"


def test_a_second_writer_is_refused(chain: ChainFile) -> None:
    with pytest.raises(AuditFileError, match="being written by another process"):
        ChainFile(chain.path, rotate_bytes=10**9)


def test_rotation_keeps_the_chain_and_sorts_files_in_order(tmp_path: Path) -> None:
    chain = ChainFile(tmp_path / "audit.jsonl", rotate_bytes=400)
    for i in range(12):
        chain.append(_records(1, start=i))
    chain.close()
    files = chain_files(tmp_path / "audit.jsonl")
    assert len(files) > 3 and files[0].name == "audit.000000000001.jsonl"
    result = verify_chain(tmp_path / "audit.jsonl")
    assert result.ok and result.records == 12 and result.last_seq == 12


@pytest.mark.parametrize(
    ("damage", "line", "seq", "reason"),
    [
        ("edit", 3, 3, "edited: its hash does not match its content"),
        ("rehash", 3, 3, "edited: content and hash were rewritten"),
        ("delete", 4, 5, "deleted: seq 4 missing right before this record"),
        ("delete_two", 3, 5, "deleted: seqs 3 to 4 missing"),
        ("cut_tail", 6, 6, "deleted: seqs 6 to 6 missing at the end (head says 6)"),
        ("garble", 2, None, "unreadable record"),
    ],
)
def test_verify_names_the_first_bad_record(
    chain: ChainFile, damage: str, line: int, seq: int | None, reason: str
) -> None:
    chain.append(_records(6))
    lines = _lines(chain.path)
    if damage == "edit":
        lines[2] = lines[2].replace("print(2)", "print(20)")
    elif damage == "rehash":  # edit, then recompute the record's own hash
        record = unseal(lines[2]).record
        record["code"] = "print('innocent')"
        lines[2] = seal(record, seq=3, prev=record["prev"])[0].decode()
    elif damage == "delete":
        del lines[3]
    elif damage == "delete_two":
        del lines[2:4]
    elif damage == "cut_tail":
        del lines[5]
    elif damage == "garble":
        lines[1] = lines[1][:40] + "\n"
    chain.path.write_text("".join(lines))
    problem = verify_chain(chain.path).problem
    assert problem is not None
    assert (problem.line, problem.seq) == (line, seq)
    assert problem.reason.startswith(reason)


def test_a_failed_write_leaves_no_half_line_and_the_chain_resumes(
    chain: ChainFile, tmp_path: Path
) -> None:
    chain.append(_records(2))
    saved = tmp_path / "saved.jsonl"
    os.replace(chain.path, saved)
    os.symlink("/dev/full", chain.path)  # the disk is full
    with pytest.raises(OSError):
        chain.append(_records(1, start=2))
    assert chain.seq == 2
    os.replace(saved, chain.path)  # space again, the file is back
    chain.append(_records(1, start=3))
    assert [r["seq"] for r in read_records(chain.path)] == [1, 2, 3]
    assert verify_chain(chain.path).ok


def test_a_crash_left_half_line_is_not_glued_onto(chain: ChainFile) -> None:
    chain.append(_records(1))
    with chain.path.open("a") as handle:
        handle.write('{"seq":2,"event":"exe')
    chain.close()
    again = ChainFile(chain.path, rotate_bytes=10**9)
    again.append(_records(1, start=1))
    again.close()
    lines = _lines(chain.path)
    assert len(lines) == 3 and unseal(lines[2]).seq == 2
    problem = verify_chain(chain.path).problem
    assert problem is not None and problem.line == 2


# -- the CLI ---------------------------------------------------------------------------------


def test_cli_verify_reports_ok_then_names_the_deleted_record(
    chain: ChainFile, capsys: pytest.CaptureFixture[str]
) -> None:
    chain.append(_records(5))
    assert main(["audit", "verify", "--path", str(chain.path)]) == 0
    assert capsys.readouterr().out == "ok: 5 records (seq 1 to 5) in 1 file, chain intact\n"
    lines = _lines(chain.path)
    del lines[2]
    chain.path.write_text("".join(lines))
    assert main(["audit", "verify", "--path", str(chain.path)]) == 1
    err = capsys.readouterr().err
    assert f"audit chain broken at {chain.path}:3 (seq 4): deleted: seq 3 missing" in err
    assert "2 records before it are intact" in err


def test_cli_verify_without_records_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", "verify", "--path", str(tmp_path / "none.jsonl")]) == 2
    assert "no audit records at" in capsys.readouterr().err


def test_head_file_tracks_the_last_record(chain: ChainFile) -> None:
    chain.append(_records(2))
    head = json.loads((chain.path.parent / "audit.jsonl.head").read_text())
    assert head == {"seq": 2, "hash": chain.last_hash, "file": "audit.jsonl"}


def test_cli_query_joins_outcomes_and_filters(
    chain: ChainFile, capsys: pytest.CaptureFixture[str]
) -> None:
    def execute(user: str, kernel: str, msg: str, time: str, code: str) -> dict:
        return {"time": time, "event": "execute", "user": user, "kernel_id": kernel,
                "kernelspec": "python-gpu" if kernel == "k2" else "python-cpu",
                "msg_id": msg, "code": code}  # fmt: skip

    chain.append([
        execute("alice", "k1", "m1", "2026-11-22T08:00:00.000000Z", "old()"),
        execute("alice", "k1", "m2", "2026-11-22T10:00:00.000000Z", "ok()\nmore()"),
        {"time": "2026-11-22T10:00:01.000000Z", "event": "execute_reply", "kernel_id": "k1",
         "msg_id": "m2", "outcome": "ok", "duration_ms": 12.5},
        execute("alice", "k2", "m3", "2026-11-22T10:01:00.000000Z", "train()"),
        execute("bob", "k3", "m4", "2026-11-22T10:02:00.000000Z", "bob()"),
        {"time": "2026-11-22T10:03:00.000000Z", "event": "kernel_stop", "kernel_id": "k2",
         "user": "alice", "reason": "died"},
    ])  # fmt: skip
    query = ["audit", "query", "--path", str(chain.path), "--user", "alice", "--json"]
    assert main([*query, "--since", "2026-11-22T09:00:00Z"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["code"], r["outcome"], r["duration_ms"]) for r in rows] == [
        ("ok()\nmore()", "ok", 12.5), ("train()", "no_reply", None)
    ]  # fmt: skip
    assert main([*query, "--kernelspec", "python-gpu"]) == 0
    assert [r["msg_id"] for r in json.loads(capsys.readouterr().out)] == ["m3"]
    assert main(["audit", "query", "--path", str(chain.path), "--user", "bob"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["TIME", "USER", "KERNELSPEC", "KERNEL", "OUTCOME", "MS", "CODE"]
    assert table[1].split() == ["2026-11-22", "10:02:00", "bob", "python-cpu", "k3", "pending",
                                "bob()"]  # fmt: skip
    assert main(["audit", "query", "--path", str(chain.path), "--lifecycle"]) == 0
    assert "kernel_stop" in capsys.readouterr().out
    assert main([*query, "--since", "yesterday"]) == 2
    assert "--since 'yesterday' is neither a duration" in capsys.readouterr().err
