"""The scheduler's background work: each step on its own interval, failures isolated.

- ``queues`` (every ``queue_interval_s``): time out and drop abandoned requests, promote
  heads that fit (releases promote at once; this catches what another replica freed);
- ``reconcile`` (every ``reconcile_interval_s``, with a gateway): leases against EG's
  kernels (:mod:`scheduler.reconcile`);
- ``gpu_hours`` (every ``gpu_hours_interval_s``, with a gateway): stop GPU kernels of users
  whose GPU-hours reached their quota;
- ``evictions`` (every ``eviction_interval_s``, with a gateway): warn and stop idle kernels
  (:mod:`scheduler.eviction`);
- ``stopped`` (every ``stopped_interval_s``): delete stopped leases' copies past the time
  they are listed for (:meth:`scheduler.leases.LeaseStore.trim_stopped`).

A failing round is logged and counted (``loop_errors_total{loop}``) and the loop goes on;
while Redis is down that is one warning when it starts failing and one line when it is
back, not one per round. Nothing here touches running kernels unless Redis and EG both
answered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .errors import SchedulerError
from .eviction import Evictor
from .reconcile import Reconciler
from .service import Scheduler

log = logging.getLogger(__name__)

Step = Callable[[], Awaitable[object]]


class Loops:
    """Runs the background steps of ``scheduler`` until stopped."""

    def __init__(
        self,
        scheduler: Scheduler,
        *,
        reconciler: Reconciler | None = None,
        queue_interval_s: float = 0.5,
        reconcile_interval_s: float = 15.0,
        gpu_hours_interval_s: float = 30.0,
        evictor: Evictor | None = None,
        eviction_interval_s: float = 5.0,
        stopped_interval_s: float = 60.0,
    ) -> None:
        self.scheduler = scheduler
        self.steps: dict[str, tuple[Step, float]] = {
            "queues": (self.queues, queue_interval_s),
            "stopped": (scheduler.leases.trim_stopped, stopped_interval_s),
        }
        if reconciler is not None:
            self.steps["reconcile"] = (reconciler.run_once, reconcile_interval_s)
            self.steps["gpu_hours"] = (reconciler.enforce_gpu_hours, gpu_hours_interval_s)
        if evictor is not None:
            self.steps["evictions"] = (evictor.sweep, eviction_interval_s)
        self._failing: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []

    async def queues(self) -> None:
        """Expire, then promote every pool with waiting requests (Redis data of an older
        scheduler is migrated first, if start-up could not)."""
        await self.scheduler.ensure_layout()
        await self.scheduler.expire_queues()
        await self.scheduler.promote_all()

    async def run_step(self, name: str) -> bool:
        """Run one round of ``name``; False if it failed (logged and counted)."""
        step, _ = self.steps[name]
        try:
            await step()
        except SchedulerError as e:
            self._failed(name, e.log_message)
            return False
        except Exception:
            log.exception("background step %s failed", name)
            self.scheduler.metrics.loop_errors.labels(loop=name).inc()
            return False
        if name in self._failing:
            self._failing.discard(name)
            log.info("background step %s works again", name)
        return True

    def _failed(self, name: str, why: str) -> None:
        self.scheduler.metrics.loop_errors.labels(loop=name).inc()
        if name not in self._failing:
            self._failing.add(name)
            log.warning("background step %s failed (retrying quietly until it works): %s",
                        name, why)  # fmt: skip

    async def _every(self, name: str, interval_s: float) -> None:
        while True:
            await self.run_step(name)
            await asyncio.sleep(interval_s)

    def start(self) -> None:
        """Start every step as a task of the running loop."""
        for name, (_, interval_s) in self.steps.items():
            self._tasks.append(asyncio.create_task(self._every(name, interval_s), name=name))

    async def stop(self) -> None:
        """Cancel the steps and wait for them to end."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
