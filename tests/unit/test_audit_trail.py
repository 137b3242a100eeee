"""What the audit trail records, and how the channels hook reads client and kernel messages."""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.session import Session
from prometheus_client import REGISTRY

from gateway.server.audit import AuditTrail, ExecuteRequest
from gateway.server.audit_channels import (
    encode_v1,
    execution_of,
    parse_client_message,
    reply_of,
)
from gateway.server.audit_file import ChainFile
from gateway.server.audit_format import read_records
from gateway.server.audit_sink import AuditSink, AuditUnavailable
from gateway.server.errors import GatewayError
from gateway.server.identity import Identity

ALICE = Identity("alice", frozenset({"analysts"}))
OPS = Identity("ops", frozenset(), admin=True)
PASSWORD = "hunter2-warehouse"


def _spec(pool: str = "cpu", **audit: Any) -> dict[str, Any]:
    curated: dict[str, Any] = {"name": "warehouse", "pool": pool, "groups": ["*"]}
    if audit:
        curated["audit"] = audit
    return {"metadata": {"kernelfleet": curated}}


class FullDisk(ChainFile):
    """Every write fails with ENOSPC."""

    def append(self, records: Sequence[Mapping[str, Any]]) -> list[bytes]:
        raise OSError(28, "No space left on device")


@pytest.fixture
async def trail(tmp_path: Path) -> AsyncIterator[AuditTrail]:
    sink = AuditSink(ChainFile(tmp_path / "audit.jsonl", rotate_bytes=10**9))
    trail = AuditTrail(sink, clock=iter(range(1_800_000_000, 1_900_000_000)).__next__)
    yield trail
    await sink.close()


async def _records(trail: AuditTrail) -> list[dict[str, Any]]:
    assert trail.sink is not None
    await trail.sink.close()
    return list(read_records(trail.sink.chain.path))


async def test_an_execution_records_who_what_where_and_its_outcome(trail: AuditTrail) -> None:
    trail.values.add("k1", {"WAREHOUSE_PASSWORD": PASSWORD})
    await trail.kernel_started(
        "k1", ALICE, kernel_name="warehouse", spec=_spec(),
        secrets=[{"env": "WAREHOUSE_PASSWORD", "path": "kv/data/teams/analysts/warehouse"}],
    )  # fmt: skip
    context = trail.context("k1")
    assert context is not None
    request = ExecuteRequest(
        msg_id="m1", code=f"connect(password='{PASSWORD}')", session="s1",
        notebook_path="reports/q3.ipynb", cell_id="c-7",
    )  # fmt: skip
    assert trail.execution_requested(context, ALICE, request) is None  # buffered: go on
    trail.execution_replied(
        "k1", "m1", {"status": "error", "ename": "AuthError", "evalue": f"bad {PASSWORD}",
                     "execution_count": 4},
    )  # fmt: skip
    trail.execution_replied("k1", "not-ours", {"status": "ok"})
    await trail.kernel_stopped("k1", reason="shutdown", by="alice")
    start, execute, reply, stop = await _records(trail)
    assert start["event"] == "kernel_start" and start["secrets"][0]["env"] == "WAREHOUSE_PASSWORD"
    assert execute == {
        **execute,
        "event": "execute", "user": "alice", "groups": ["analysts"], "kernel_id": "k1",
        "kernelspec": "warehouse", "pool": "cpu", "msg_id": "m1", "session": "s1",
        "notebook_path": "reports/q3.ipynb", "cell_id": "c-7",
        "code": "connect(password='[secret:WAREHOUSE_PASSWORD]')", "code_chars": 47,
        "redacted": ["WAREHOUSE_PASSWORD"],
    }  # fmt: skip
    assert reply["event"] == "execute_reply" and reply["outcome"] == "error"
    assert reply["duration_ms"] == 1000.0 and reply["execution_count"] == 4
    assert reply["error"]["evalue"] == "bad [secret:WAREHOUSE_PASSWORD]"
    assert stop == {**stop, "event": "kernel_stop", "reason": "shutdown", "by": "alice"}
    assert PASSWORD not in json.dumps([start, execute, reply, stop])
    assert trail.values.redact(PASSWORD) == PASSWORD  # stopped: its values are forgotten


async def test_hash_mode_keeps_only_the_codes_hash(trail: AuditTrail) -> None:
    trail.code_mode = "hash"
    await trail.kernel_started("k1", ALICE, kernel_name="warehouse", spec=_spec())
    await trail.kernel_started("k2", ALICE, kernel_name="warehouse", spec=_spec(code="full"))
    for kernel_id in ("k1", "k2"):
        context = trail.context(kernel_id)
        assert context is not None
        trail.execution_requested(context, ALICE, ExecuteRequest(msg_id="m", code="secret_sauce()"))
    hashed, full = [r for r in await _records(trail) if r["event"] == "execute"]
    assert "code" not in hashed and len(hashed["code_sha256"]) == 64
    assert full["code"] == "secret_sauce()" and full["code_sha256"] == hashed["code_sha256"]


async def test_an_admin_on_someone_elses_kernel_is_recorded_as_the_executor(
    trail: AuditTrail,
) -> None:
    await trail.kernel_started("k1", ALICE, kernel_name="warehouse", spec=_spec())
    context = trail.context("k1")
    assert context is not None
    trail.execution_requested(context, OPS, ExecuteRequest(msg_id="m", code="1"))
    execute = [r for r in await _records(trail) if r["event"] == "execute"][0]
    assert (execute["user"], execute["owner"]) == ("ops", "alice")


async def test_refusals_carry_the_reason_the_user_was_given(trail: AuditTrail) -> None:
    error = GatewayError(403, "You already have 3 of 3 kernels running.", code="quota_exceeded")
    await trail.start_refused(ALICE, kernel_name="warehouse", spec=_spec(), error=error)
    (refused,) = await _records(trail)
    assert refused == {
        **refused, "event": "kernel_refused", "user": "alice", "kernelspec": "warehouse",
        "pool": "cpu", "status": 403, "reason": "quota_exceeded",
        "message": "You already have 3 of 3 kernels running.",
    }  # fmt: skip


async def test_strict_kernelspecs_refuse_when_the_audit_cannot_be_written(tmp_path: Path) -> None:
    sink = AuditSink(FullDisk(tmp_path / "audit.jsonl", rotate_bytes=10**9), durable_timeout_s=1)
    trail = AuditTrail(sink, strict=False)
    assert trail.is_strict(_spec(strict=True)) and not trail.is_strict(_spec())
    assert AuditTrail(None, strict=True).is_strict(_spec()) and not trail.is_strict(
        _spec(strict=False)
    )
    await trail.kernel_started("strict", ALICE, kernel_name="warehouse", spec=_spec(strict=True))
    await trail.kernel_started("lax", ALICE, kernel_name="warehouse", spec=_spec())
    strict, lax = trail.context("strict"), trail.context("lax")
    assert strict is not None and lax is not None
    before = REGISTRY.get_sample_value("kernelfleet_audit_executions_refused_total") or 0
    waiter = trail.execution_requested(strict, ALICE, ExecuteRequest(msg_id="m1", code="1"))
    assert waiter is not None
    with pytest.raises(AuditUnavailable, match="No space left on device"):
        await waiter
    assert "m1" not in strict.pending
    assert REGISTRY.get_sample_value("kernelfleet_audit_executions_refused_total") == before + 1
    assert trail.execution_requested(lax, ALICE, ExecuteRequest(msg_id="m2", code="1")) is None
    with pytest.raises(GatewayError) as refused:
        trail.check_may_start("warehouse", _spec(strict=True))
    assert refused.value.status_code == 503 and "cannot be written" in refused.value.message
    trail.check_may_start("warehouse", _spec())  # not strict: starts
    await sink.close(timeout_s=0.5)


async def test_only_a_lax_trail_with_room_lets_a_request_go_before_its_record(
    tmp_path: Path,
) -> None:
    """Strict kernels are recorded before they run; a full buffer holds requests back
    (back-pressure) instead of letting executions through unrecorded."""
    sink = AuditSink(ChainFile(tmp_path / "audit.jsonl", rotate_bytes=10**9), capacity=10)
    trail = AuditTrail(sink, strict=False)
    await trail.kernel_started("strict", ALICE, kernel_name="warehouse", spec=_spec(strict=True))
    await trail.kernel_started("lax", ALICE, kernel_name="warehouse", spec=_spec())
    strict, lax = trail.context("strict"), trail.context("lax")
    assert strict is not None and lax is not None
    assert trail.forwards_first(lax) and not trail.forwards_first(strict)
    while sink.offer({"event": "filler"}):
        pass
    assert not trail.forwards_first(lax)  # full: record (and wait for room) first
    await sink.close(timeout_s=0.5)
    unaudited = AuditTrail(None, strict=False)
    await unaudited.kernel_started("k", ALICE, kernel_name="warehouse", spec=_spec())
    context = unaudited.context("k")
    assert context is not None and unaudited.forwards_first(context)


# -- reading the wire ----------------------------------------------------------------------------


def _message(msg_type: str, content: dict[str, Any], *, channel: str = "shell") -> dict[str, Any]:
    header = {"msg_id": "m-1", "msg_type": msg_type, "session": "s-1", "username": "u",
              "version": "5.3", "date": ""}  # fmt: skip
    return {"header": header, "parent_header": {}, "metadata": {"cellId": "cell-9"},
            "content": content, "channel": channel, "buffers": []}  # fmt: skip


def _v1(msg: dict[str, Any]) -> bytes:
    parts = [
        json.dumps(msg[k]).encode() for k in ("header", "parent_header", "metadata", "content")
    ]
    return encode_v1(msg["channel"], parts)


def _legacy_binary(msg: dict[str, Any]) -> bytes:
    body = json.dumps({k: v for k, v in msg.items() if k != "buffers"}).encode()
    buffer = b"\x00\x01"
    return struct.pack("!iII", 2, 12, 12 + len(body)) + body + buffer


@pytest.mark.parametrize("wire", ["json", "v1", "legacy_binary"])
def test_executions_are_found_in_every_wire_format(wire: str) -> None:
    msg = _message("execute_request", {"code": "print(1)", "silent": False})
    encoders: dict[str, Any] = {"json": json.dumps, "v1": _v1, "legacy_binary": _legacy_binary}
    raw = encoders[wire](msg)
    parsed = parse_client_message(raw, v1=wire == "v1")
    assert parsed is not None
    request = execution_of(parsed, notebook_path="a.ipynb")
    assert request == ExecuteRequest(
        msg_id="m-1", code="print(1)", session="s-1", notebook_path="a.ipynb", cell_id="cell-9"
    )


def test_escaped_or_control_channel_executions_are_still_found() -> None:
    escaped = json.dumps(_message("execute_request", {"code": "x"})).replace(
        "execute_request", "execute\\u005frequest"
    )
    parsed = parse_client_message(escaped, v1=False)
    assert parsed is not None and execution_of(parsed) is not None
    control = _message("execute_request", {"code": "x"}, channel="control")
    parsed = parse_client_message(json.dumps(control), v1=False)
    assert parsed is not None and execution_of(parsed) is not None
    debug = _message("debug_request", {"command": "evaluate", "arguments": {"expression": "x"}})
    parsed = parse_client_message(json.dumps(debug), v1=False)
    assert parsed is not None
    evaluate = execution_of(parsed)
    assert evaluate is not None and (evaluate.code, evaluate.kind) == ("x", "debug_evaluate")
    for other in (_message("kernel_info_request", {}), _message("comm_msg", {"data": {}})):
        parsed = parse_client_message(json.dumps(other), v1=False)
        assert parsed is not None and execution_of(parsed) is None
    assert parse_client_message(b"\x01garbage", v1=True) is None
    forged = (2**62).to_bytes(8, "little") + b"x" * 64  # must not loop 2**62 times
    assert parse_client_message(forged, v1=True) is None
    assert parse_client_message(struct.pack("!i", 2**30) + b"x" * 64, v1=False) is None


def test_replies_are_matched_from_the_kernels_frames() -> None:
    session = Session(key=b"k")
    request = session.msg("execute_request", {"code": "1"})
    reply = session.msg("execute_reply", {"status": "ok", "execution_count": 3}, parent=request)
    frames = session.serialize(reply, ident=[b"client-id"])
    assert reply_of(frames, session) == (
        request["header"]["msg_id"],
        {"status": "ok", "execution_count": 3},
    )
    status = session.serialize(session.msg("status", {"execution_state": "idle"}, parent=request))
    assert reply_of(status, session) is None


async def test_warm_claims_evictions_and_deaths_are_told_apart(tmp_path: Path) -> None:
    from gateway.server.compliance import Compliance

    sink = AuditSink(ChainFile(tmp_path / "audit.jsonl", rotate_bytes=10**9))
    compliance = Compliance(AuditTrail(sink))
    for kernel_id in ("warm", "idle", "dead", "exit"):
        await compliance.claimed(kernel_id, ALICE, "warehouse", _spec())
    compliance.note_eviction("idle", "idle for 30m (python-gpu allows 30m)")
    compliance.note_died("dead")
    compliance.note_stop_request("warm", OPS)
    for kernel_id in ("warm", "idle", "dead"):
        await compliance.ended(kernel_id)
    compliance.shutting_down = True
    await compliance.ended("exit")
    await compliance.ended("never-started")  # a failed start: nothing to record
    await sink.close()
    events = [(r["event"], r["kernel_id"], r.get("reason"), r.get("by")) for r in
              read_records(sink.chain.path)]  # fmt: skip
    assert events == [
        ("kernel_warm_claim", "warm", None, None),
        ("kernel_warm_claim", "idle", None, None),
        ("kernel_warm_claim", "dead", None, None),
        ("kernel_warm_claim", "exit", None, None),
        ("kernel_stop", "warm", "shutdown", "ops"),
        ("kernel_evict", "idle", "idle for 30m (python-gpu allows 30m)", "scheduler"),
        ("kernel_stop", "dead", "died", None),
        ("kernel_stop", "exit", "gateway_shutdown", None),
    ]
