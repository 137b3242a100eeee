"""Kernel activity for the scheduler: execution state, last activity and connections, batched.

The scheduler keeps each lease's state (starting, idle, busy) from these reports and uses
them for idle policies. :class:`ActivityReporter` takes a snapshot of the gateway's kernels
every ``interval_s`` and sends what changed since the last accepted batch in one request
(``PUT /v1/activity``); every ``full_every_s`` it sends everything, so a scheduler that
lost a batch (or restarted) converges. A kernel that dies is reported at once, not at the
next tick; so is one that disappeared from the gateway without being released. Reports
are snapshots, so sending one twice is harmless; a failed batch is sent again later.

Pure asyncio, no EG imports: the kernel manager hands in ``snapshot`` and ``send``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("kernelfleet.gateway")

DEAD = "dead"
MAX_BATCH = 1000


@dataclass(frozen=True)
class KernelActivity:
    """What the gateway knows about one kernel's activity now."""

    execution_state: str
    last_activity: float | None  # unix seconds
    connections: int

    def report(self, kernel_id: str) -> dict[str, object]:
        """The JSON report of the scheduler's ``PUT /v1/activity``."""
        return {
            "kernel_id": kernel_id,
            "execution_state": self.execution_state,
            "last_activity": self.last_activity,
            "connections": self.connections,
        }


Snapshot = Callable[[], dict[str, KernelActivity]]
Send = Callable[[list[dict[str, object]]], Awaitable[bool]]


class ActivityReporter:
    """Sends batched activity reports of the kernels in ``snapshot()`` through ``send``.

    ``send`` returns whether the scheduler accepted the batch and never raises.
    ``clock`` (monotonic seconds) is injectable so tests can jump time.
    """

    def __init__(
        self,
        snapshot: Snapshot,
        send: Send,
        *,
        interval_s: float = 1.0,
        full_every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._snapshot = snapshot
        self._send = send
        self.interval_s = interval_s
        self.full_every_s = full_every_s
        self._clock = clock
        self._sent: dict[str, KernelActivity] = {}
        self._dead: set[str] = set()
        self._last_full = float("-inf")
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()

    def kernel_died(self, kernel_id: str) -> None:
        """Report ``kernel_id`` dead with the next batch, sent right away."""
        self._dead.add(kernel_id)
        self._wake.set()

    def _batch(self) -> tuple[dict[str, KernelActivity], bool, list[dict[str, object]]]:
        """The snapshot, whether a full batch is due, and the reports to send."""
        current = {k: v for k, v in self._snapshot().items() if k not in self._dead}
        full = self._clock() - self._last_full >= self.full_every_s
        reports = [
            activity.report(kernel_id)
            for kernel_id, activity in sorted(current.items())
            if full or self._sent.get(kernel_id) != activity
        ]
        gone = (set(self._sent) - set(current)) | self._dead
        reports += [KernelActivity(DEAD, None, 0).report(k) for k in sorted(gone)]
        return current, full, reports

    def pending(self) -> list[dict[str, object]]:
        """The reports the next batch carries (changes, deaths, or everything when due)."""
        return self._batch()[2]

    async def flush(self) -> bool:
        """Send what changed; True when there was nothing to send or all was accepted."""
        async with self._flushing:
            current, full, reports = self._batch()
            for start in range(0, len(reports), MAX_BATCH):
                if not await self._send(reports[start : start + MAX_BATCH]):
                    return False  # everything stays pending for the next try
            self._sent = current
            self._dead -= {str(r["kernel_id"]) for r in reports}
            if full:
                self._last_full = self._clock()
            return True

    async def run(self) -> None:
        """Flush every ``interval_s``, or at once when a kernel died."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # a bug here must not stop reporting for good
                log.exception("Sending kernel activity to the scheduler failed")

    def start(self) -> None:
        """Start reporting in the running event loop (once)."""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self.run())

    async def stop(self) -> None:
        """Stop reporting, after a last flush."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.flush()
