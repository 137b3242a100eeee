"""The audit sink: bounded buffer, nothing lost when the disk is slow, strict writes, shipping."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from gateway.server.audit_file import ChainFile
from gateway.server.audit_format import read_records, verify_chain
from gateway.server.audit_sink import AuditSink, AuditUnavailable, HttpShipper


class SlowChain(ChainFile):
    """A chain file whose every batch takes ``delay_s`` (a slow disk)."""

    delay_s = 0.02

    def append(self, records: Sequence[Mapping[str, Any]]) -> list[bytes]:
        threading.Event().wait(self.delay_s)
        return super().append(records)


class BrokenChain(ChainFile):
    """A chain file whose writes fail with ENOSPC while ``broken`` is set (a full disk)."""

    broken = True

    def append(self, records: Sequence[Mapping[str, Any]]) -> list[bytes]:
        if self.broken:
            raise OSError(28, "No space left on device")
        return super().append(records)


class StuckChain(ChainFile):
    """A chain file whose writes hang until ``release`` is set (a stalled NFS mount)."""

    release = threading.Event()

    def append(self, records: Sequence[Mapping[str, Any]]) -> list[bytes]:
        self.release.wait(5)
        return super().append(records)


@pytest.fixture
def path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "audit.jsonl"


def _record(i: int) -> dict[str, Any]:
    return {"time": "2026-11-22T10:00:00.000000Z", "event": "execute", "n": i}


def _ns(path: Path) -> list[Any]:
    return [r.get("n") for r in read_records(path) if r["event"] == "execute"]


def _metric(name: str) -> float | None:
    return REGISTRY.get_sample_value(name)


async def test_records_are_written_in_order_and_depth_drains(path: Path) -> None:
    sink = AuditSink(ChainFile(path, rotate_bytes=10**9), capacity=100)
    for i in range(50):
        await sink.append(_record(i))
    assert sink.depth > 0 and _metric("kernelfleet_audit_buffer_depth") == sink.depth
    await sink.close()
    assert _ns(path) == list(range(50))
    assert sink.depth == 0 and verify_chain(path).ok


async def test_a_slow_disk_loses_nothing_producers_wait_for_room(path: Path) -> None:
    sink = AuditSink(SlowChain(path, rotate_bytes=10**9), capacity=5, buffer_timeout_s=10)
    before = _metric("kernelfleet_audit_records_dropped_total") or 0
    await asyncio.gather(*(sink.append(_record(i)) for i in range(60)))
    assert sink.depth <= 5
    await sink.close()
    assert sorted(_ns(path)) == list(range(60))
    assert (_metric("kernelfleet_audit_records_dropped_total") or 0) == before


async def test_when_the_buffer_stays_full_drops_are_counted_and_reported(path: Path) -> None:
    chain = BrokenChain(path, rotate_bytes=10**9)
    sink = AuditSink(chain, capacity=3, buffer_timeout_s=0.05)
    for i in range(5):
        await sink.append(_record(i))
    assert sink.depth == 3 and sink.dropped == 2 and not sink.healthy
    chain.broken = False
    await sink.close()
    records = list(read_records(path))
    assert records[0]["event"] == "audit_gap" and records[0]["dropped"] == 2
    assert _ns(path) == [0, 1, 2]


async def test_a_failing_disk_keeps_records_and_refuses_durable_ones(path: Path) -> None:
    chain = BrokenChain(path, rotate_bytes=10**9)
    sink = AuditSink(chain, capacity=100, durable_timeout_s=2)
    await sink.append(_record(1))
    with pytest.raises(AuditUnavailable, match=r"cannot be written \(No space left on device\)"):
        await sink.append(_record(2), durable=True)
    assert not sink.healthy and _metric("kernelfleet_audit_healthy") == 0
    assert sink.depth == 1  # the refused record is gone, the other one waits
    chain.broken = False
    await sink.append(_record(3), durable=True)
    assert sink.healthy and _metric("kernelfleet_audit_healthy") == 1
    await sink.close()
    assert _ns(path) == [1, 3]


async def test_a_durable_record_that_times_out_is_never_written(path: Path) -> None:
    StuckChain.release.clear()
    sink = AuditSink(StuckChain(path, rotate_bytes=10**9), capacity=100, durable_timeout_s=0.2)
    await sink.append(_record(1))  # the writer takes it and hangs
    await asyncio.sleep(0.05)
    with pytest.raises(AuditUnavailable, match="timed out"):
        await sink.append(_record(2), durable=True)
    StuckChain.release.set()
    await sink.close()
    assert _ns(path) == [1]


async def test_written_batches_are_shipped_and_retried(path: Path) -> None:
    received: list[bytes] = []
    failures = [503]

    def answer(request: httpx.Request) -> httpx.Response:
        if failures:
            return httpx.Response(failures.pop())
        assert request.headers["Authorization"] == "Bearer siem-token"
        assert request.headers["Content-Type"] == "application/x-ndjson"
        received.append(request.content)
        return httpx.Response(200)

    shipper = HttpShipper(
        "http://siem.example/ingest", token="siem-token", transport=httpx.MockTransport(answer)
    )
    sink = AuditSink(ChainFile(path, rotate_bytes=10**9), shipper=shipper)
    for i in range(3):
        await sink.append(_record(i))
    for _ in range(100):
        if received:
            break
        await asyncio.sleep(0.05)
    await sink.close()
    shipped = [json.loads(line) for chunk in received for line in chunk.splitlines()]
    assert [r["n"] for r in shipped] == [0, 1, 2]
    assert path.read_bytes() == b"".join(received)
