"""Where audit records go: a bounded buffer in front of the chain file, and SIEM shipping.

:class:`AuditSink` never blocks EG's event loop: records wait in a bounded in-memory buffer
and one writer task seals and writes them in batches from a worker thread
(:class:`~gateway.server.audit_file.ChainFile`). A slow or failing disk does not lose
records:

- a failed batch stays in the buffer and is retried (backoff up to 2 s; a strict record
  cuts the wait short, so it learns at once whether the disk is back);
- ``append(record)`` waits up to ``buffer_timeout_s`` for room when the buffer is full;
  only then is the record dropped, counted, logged, and an ``audit_gap`` record saying how
  many were dropped goes into the chain as soon as it can be written;
- ``append(record, durable=True)`` (strict mode) returns only once the record is on disk,
  or raises :class:`AuditUnavailable` (never leaving a record for something refused).

Every written batch is also handed to a :class:`Shipper` (e.g. :class:`HttpShipper` for a
SIEM's HTTP collector), with its own bounded backlog and retries: the file stays the
source of truth. Metrics (Prometheus): buffer depth and capacity, records written and
dropped, write errors, whether the sink is healthy, shipping errors.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from prometheus_client import Counter, Gauge

from .audit_file import ChainFile
from .audit_format import utc_timestamp

log = logging.getLogger("kernelfleet.gateway.audit")

BUFFER_DEPTH = Gauge("kernelfleet_audit_buffer_depth", "Audit records accepted, not yet written")
BUFFER_CAPACITY = Gauge("kernelfleet_audit_buffer_capacity", "Audit buffer size (records)")
WRITTEN = Counter("kernelfleet_audit_records_written", "Audit records written to the chain")
DROPPED = Counter("kernelfleet_audit_records_dropped", "Audit records dropped: buffer full")
WRITE_ERRORS = Counter("kernelfleet_audit_write_errors", "Failed audit batch writes")
HEALTHY = Gauge("kernelfleet_audit_healthy", "1 when the last audit write succeeded")
SHIP_ERRORS = Counter("kernelfleet_audit_ship_errors", "Failed shipments to the SIEM")

MAX_BATCH = 500
MAX_BACKOFF_S = 2.0
SHIP_BACKLOG_BATCHES = 1000


class AuditUnavailable(Exception):
    """The audit trail cannot take a record now; ``str()`` says why, for a user to read."""


class Shipper(Protocol):
    """Sends written audit lines elsewhere (a SIEM). Raise to have the batch retried."""

    async def ship(self, lines: list[bytes]) -> None: ...

    async def aclose(self) -> None: ...


class HttpShipper:
    """POSTs each batch as JSON Lines (``application/x-ndjson``) to ``url``.

    ``token`` (optional) goes in ``Authorization: Bearer <token>``. Any answer but 2xx is a
    failure, retried by the sink.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str = "",
        timeout_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Content-Type": "application/x-ndjson"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.url = url
        self._client = httpx.AsyncClient(timeout=timeout_s, headers=headers, transport=transport)

    async def ship(self, lines: list[bytes]) -> None:
        response = await self._client.post(self.url, content=b"".join(lines))
        if response.status_code >= 300:
            raise RuntimeError(f"{self.url} answered {response.status_code}")

    async def aclose(self) -> None:
        await self._client.aclose()


@dataclass(eq=False)
class _Item:
    record: dict[str, Any]
    future: asyncio.Future[None] | None = None
    state: str = "queued"  # queued | writing | done | cancelled


@dataclass
class _Gap:
    dropped: int = 0
    since: float = 0.0


@dataclass
class _Outage:
    """The current write failure, if any (``reason`` is what users and the log see)."""

    reason: str = ""
    since: float = 0.0
    backoff_s: float = 0.0


class AuditSink:
    """The bounded buffer and writer task in front of a :class:`ChainFile` (module docstring)."""

    def __init__(
        self,
        chain: ChainFile,
        *,
        capacity: int = 10_000,
        buffer_timeout_s: float = 5.0,
        durable_timeout_s: float = 5.0,
        shipper: Shipper | None = None,
        clock: Callable[[], float] | None = None,
        coalesce_s: float = 0.0,
    ) -> None:
        self.chain = chain
        self.capacity = capacity
        # Seconds a batch of non-durable records waits for more before it is written: one
        # thread hand-off per execution competed with the kernel messages of the same cell
        # (bench/README.md). Durable records and closing write at once.
        self.coalesce_s = coalesce_s
        self.buffer_timeout_s = buffer_timeout_s
        self.durable_timeout_s = durable_timeout_s
        self.shipper = shipper
        self._clock = clock or time.time
        self._pending: deque[_Item] = deque()
        self._inflight: list[_Item] = []
        self._gap = _Gap()
        self._outage: _Outage | None = None
        self._closing = False
        self._wakeup: asyncio.Event | None = None
        self._urgent: asyncio.Event | None = None
        self._space: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._ship_backlog: deque[list[bytes]] = deque()
        self._ship_wakeup: asyncio.Event | None = None
        self._shipper_task: asyncio.Task[None] | None = None
        BUFFER_CAPACITY.set(capacity)
        BUFFER_DEPTH.set_function(lambda: self.depth)
        HEALTHY.set(1)

    # -- state -------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Records accepted and not yet written (buffered or being written)."""
        return len(self._pending) + len(self._inflight)

    @property
    def healthy(self) -> bool:
        """False while writes fail (since the last failed batch, until one succeeds)."""
        return self._outage is None

    @property
    def outage_reason(self) -> str:
        """Why writing fails now ('' when healthy)."""
        return self._outage.reason if self._outage else ""

    @property
    def dropped(self) -> int:
        """Records dropped (buffer full) and not yet reported by an ``audit_gap`` record."""
        return self._gap.dropped

    # -- producers ---------------------------------------------------------------------------

    def has_room(self) -> bool:
        """Whether :meth:`offer` would take a record now."""
        return not self._closing and self.depth < self.capacity

    def offer(self, record: dict[str, Any]) -> bool:
        """Buffer ``record`` if there is room now (no waiting); False if the buffer is full."""
        if not self.has_room():
            return False
        self._push(_Item(record))
        return True

    async def append(self, record: dict[str, Any], *, durable: bool = False) -> None:
        """Buffer ``record``; with ``durable``, return only once it is written.

        Not durable: waits up to ``buffer_timeout_s`` for room, then drops it (counted,
        reported later by an ``audit_gap`` record); never raises. Durable: raises
        AuditUnavailable when it cannot be written within ``durable_timeout_s``.
        """
        if not durable:
            if not self.offer(record):
                await self._append_when_room(record)
            return
        if self._closing or not await self._wait_for_room(self.durable_timeout_s):
            raise AuditUnavailable(self._unavailable_reason("the audit buffer is full"))
        item = _Item(record, asyncio.get_running_loop().create_future())
        self._push(item)
        await self._wait_written(item)

    async def _append_when_room(self, record: dict[str, Any]) -> None:
        if not self._closing and await self._wait_for_room(self.buffer_timeout_s):
            self._push(_Item(record))
            return
        if self._gap.dropped == 0:
            self._gap.since = self._clock()
            log.error(
                "Audit buffer full (%d records) for %.0f s: dropping records until it drains",
                self.capacity,
                self.buffer_timeout_s,
            )
        self._gap.dropped += 1
        DROPPED.inc()

    async def _wait_written(self, item: _Item) -> None:
        assert item.future is not None
        try:
            await asyncio.wait_for(asyncio.shield(item.future), self.durable_timeout_s)
        except asyncio.TimeoutError:
            if item.state == "queued":
                item.state = "cancelled"
                self._pending.remove(item)
                self._room_made()
                raise AuditUnavailable(
                    self._unavailable_reason("writing the audit record timed out")
                ) from None
            await item.future  # being written: its outcome decides

    def _unavailable_reason(self, fallback: str) -> str:
        return self._outage.reason if self._outage else fallback

    def _push(self, item: _Item) -> None:
        self._pending.append(item)
        self._ensure_tasks()
        assert self._wakeup is not None and self._urgent is not None
        self._wakeup.set()
        if item.future is not None:
            self._urgent.set()

    async def _wait_for_room(self, timeout_s: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self._ensure_tasks()
        assert self._space is not None
        while self.depth >= self.capacity:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._space.clear()
            try:
                await asyncio.wait_for(self._space.wait(), remaining)
            except asyncio.TimeoutError:
                return False
        return True

    def _room_made(self) -> None:
        if self._space is not None:
            self._space.set()

    # -- the writer task ---------------------------------------------------------------------

    def _ensure_tasks(self) -> None:
        if self._writer is None:
            self._wakeup, self._space = asyncio.Event(), asyncio.Event()
            self._urgent = asyncio.Event()
            self._writer = asyncio.ensure_future(self._write_loop())
            if self.shipper is not None:
                self._ship_wakeup = asyncio.Event()
                self._shipper_task = asyncio.ensure_future(self._ship_loop())

    async def _write_loop(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._coalesce()
            await self._write_batch()
            if self._outage is not None:
                await self._back_off(0.1 if self._closing else self._outage.backoff_s)

    async def _coalesce(self) -> None:
        """Wait up to ``coalesce_s`` for more records, unless one is durable or we close."""
        assert self._urgent is not None
        if self.coalesce_s <= 0 or self._closing:
            return
        self._urgent.clear()
        if any(item.future is not None for item in self._pending):
            return
        try:
            await asyncio.wait_for(self._urgent.wait(), self.coalesce_s)
        except asyncio.TimeoutError:
            pass

    async def _back_off(self, seconds: float) -> None:
        """Wait before retrying a failed write, unless a strict record arrives meanwhile."""
        assert self._urgent is not None
        self._urgent.clear()
        if any(item.future is not None for item in self._pending):
            return  # a strict record is already waiting
        try:
            await asyncio.wait_for(self._urgent.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _write_batch(self) -> None:
        batch = self._take_batch()
        if not batch:
            return
        records = [item.record for item in batch]
        gap = self._gap_record()
        try:
            lines = await asyncio.to_thread(self.chain.append, [*gap, *records])
        except OSError as e:
            self._failed(batch, e)
            return
        if gap:
            self._gap = _Gap()
        self._written(batch, lines)

    def _take_batch(self) -> list[_Item]:
        batch: list[_Item] = []
        while self._pending and len(batch) < MAX_BATCH:
            item = self._pending.popleft()
            if item.state == "queued":
                item.state = "writing"
                batch.append(item)
        self._inflight = batch
        return batch

    def _gap_record(self) -> list[dict[str, Any]]:
        if not self._gap.dropped:
            return []
        return [
            {
                "time": utc_timestamp(self._gap.since),
                "event": "audit_gap",
                "dropped": self._gap.dropped,
                "reason": "the audit buffer was full",
            }
        ]

    def _written(self, batch: list[_Item], lines: list[bytes]) -> None:
        if self._outage is not None:
            log.warning("Audit log %s is writable again", self.chain.path)
            self._outage = None
            HEALTHY.set(1)
        for item in batch:
            item.state = "done"
            if item.future is not None and not item.future.done():
                item.future.set_result(None)
        self._inflight = []
        WRITTEN.inc(len(lines))
        self._room_made()
        self._queue_shipment(lines)

    def _failed(self, batch: list[_Item], error: OSError) -> None:
        reason = f"the audit log cannot be written ({error.strerror or type(error).__name__})"
        WRITE_ERRORS.inc()
        HEALTHY.set(0)
        if self._outage is None:
            self._outage = _Outage(reason, self._clock(), 0.25)
            log.error("Audit log %s: %s; buffering records", self.chain.path, reason)
        else:
            self._outage.reason = reason
            self._outage.backoff_s = min(self._outage.backoff_s * 2, MAX_BACKOFF_S)
        kept = []
        for item in batch:
            if item.future is not None:  # durable: its caller refuses instead of waiting
                item.state = "done"
                if not item.future.done():
                    item.future.set_exception(AuditUnavailable(reason))
            else:
                item.state = "queued"
                kept.append(item)
        self._pending.extendleft(reversed(kept))
        self._inflight = []
        self._room_made()

    # -- shipping ----------------------------------------------------------------------------

    def _queue_shipment(self, lines: list[bytes]) -> None:
        if self.shipper is None or self._ship_wakeup is None:
            return
        if len(self._ship_backlog) >= SHIP_BACKLOG_BATCHES:
            self._ship_backlog.popleft()
            log.error("Audit shipping backlog full: oldest batch not shipped (it is on disk)")
        self._ship_backlog.append(lines)
        self._ship_wakeup.set()

    async def _ship_loop(self) -> None:
        assert self._ship_wakeup is not None and self.shipper is not None
        backoff = 0.5
        while True:
            if not self._ship_backlog:
                if self._closing:
                    return
                self._ship_wakeup.clear()
                await self._ship_wakeup.wait()
                continue
            try:
                await self.shipper.ship(self._ship_backlog[0])
            except Exception as e:
                SHIP_ERRORS.inc()
                log.warning("Shipping audit records failed: %s; retrying", _describe(e))
                if self._closing:
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            self._ship_backlog.popleft()
            backoff = 0.5

    # -- shutdown ----------------------------------------------------------------------------

    async def close(self, *, timeout_s: float = 10.0) -> None:
        """Write what is buffered (for up to ``timeout_s``), ship it, and close the file."""
        self._closing = True
        tasks = [t for t in (self._writer, self._shipper_task) if t is not None]
        for event in (self._wakeup, self._ship_wakeup):
            if event is not None:
                event.set()
        await _wait_all(tasks, timeout_s)
        if self.depth:
            log.error("Audit log %s: %d records could not be written", self.chain.path, self.depth)
        if self.shipper is not None:
            await self.shipper.aclose()
        self.chain.close()


async def _wait_all(tasks: list[asyncio.Task[None]], timeout_s: float) -> None:
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


def _describe(error: BaseException) -> str:
    return str(error) if isinstance(error, RuntimeError) else type(error).__name__
