"""Scale: 10,000 live leases for 2,000 users - eviction sweeps and Redis memory per lease.

Leases are made the real way (``Scheduler.admit``, 50 concurrent, against a fresh Redis),
then marked idle with one activity batch (``Scheduler.report_activity``, as the gateway
reports). 97% were active within the last two hours; 3% have been idle for nine hours,
past python-cpu's 8 h idle timeout. Then the scheduler's own eviction sweep
(``scheduler.eviction.Evictor.sweep``, with a gateway stand-in that answers at once) runs
three times on a clock the bench moves: the first sweep warns the idle 3%, the second
(after the warning period) evicts them, the third finds nothing to do - the steady state.
A full scan of the leases (``LeaseStore.list``: the ``kf:leases`` sorted set, then every
lease hash in one pipeline) is timed on its own too: it is what every sweep starts with.

Memory per lease is Redis ``used_memory`` after minus before, divided by the leases: it
includes the per-user and per-pool indexes the leases need.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis as sync_redis

from scheduler.activity import Report
from scheduler.service import Scheduler
from tests.support.redis_server import RedisServer

from .context import Context
from .runtime import progress
from .scheduling import bench_platform, scheduler_on, user_groups, user_name

IDLE_SHARE = 0.03
HOUR = 3600.0


@dataclass
class Clock:
    """A clock the bench sets (unix seconds)."""

    now: float

    def __call__(self) -> float:
        return self.now


class QuietGateway:
    """Stands in for Enterprise Gateway in sweeps: every notice and shutdown succeeds."""

    def __init__(self) -> None:
        self.notices = 0
        self.shutdowns = 0

    async def notice(self, kernel_id: str, text: str) -> int:
        self.notices += 1
        return 1

    async def shutdown(self, kernel_id: str) -> None:
        self.shutdowns += 1


async def _make_leases(scheduler: Scheduler, clock: Clock, *, users: int, leases: int
                       ) -> tuple[float, list[Report]]:  # fmt: skip
    """Admit ``leases`` kernels (round-robin over users); seconds taken and their activity."""
    rng = random.Random(6)
    start = clock.now
    plan = []
    for i in range(leases):
        idle = rng.random() < IDLE_SHARE
        created = start - (10 * HOUR if idle else rng.uniform(0, 2 * HOUR))
        last = start - 9 * HOUR if idle else rng.uniform(created, start)
        spec = "python-cpu-large" if i % 5 == 0 else "python-cpu"
        plan.append((str(uuid.uuid4()), i % users, spec, created, last))
    queue = list(reversed(plan))

    async def worker() -> None:
        while queue:
            kernel_id, u, spec, created, _ = queue.pop()
            clock.now = created  # the admission stamps the lease with this time
            await scheduler.admit(kernel_id=kernel_id, user=user_name(u), groups=user_groups(u),
                                  kernelspec=spec)  # fmt: skip

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(50)))
    seconds = time.perf_counter() - began
    clock.now = start
    return seconds, [Report(k, "idle", last_activity=last) for k, _, _, _, last in plan]


async def _timed(coro: Any) -> tuple[float, Any]:
    began = time.perf_counter()
    value = await coro
    return round(time.perf_counter() - began, 3), value


async def _sweeps(scheduler: Scheduler, clock: Clock, results: dict[str, Any]) -> None:
    """Three eviction sweeps (warn, evict, nothing), or the scan alone without an Evictor."""
    seconds, leases = await _timed(scheduler.leases.list())
    results["full_scan"] = {"seconds": seconds, "leases": len(leases)}
    try:
        from scheduler.eviction import Evictor
    except ImportError:
        results["sweeps"] = "no eviction sweep in the scheduler yet: full_scan is what it reads"
        return
    gateway = QuietGateway()
    evictor = Evictor(scheduler, gateway, kernelspecs=scheduler.admitter.kernelspecs)
    warning_s = max(spec.warning_before for spec in scheduler.admitter.kernelspecs.values())
    sweeps = []
    for label, advance in (("warns", 0.0), ("evicts", warning_s + 1), ("steady", 1.0)):
        clock.now += advance
        notices, shutdowns = gateway.notices, gateway.shutdowns
        seconds, evicted = await _timed(evictor.sweep())
        sweeps.append({"sweep": label, "seconds": seconds, "evicted": len(evicted),
                       "warned": gateway.notices - notices,
                       "shutdowns": gateway.shutdowns - shutdowns})  # fmt: skip
        progress(f"scale: sweep that {label}: {seconds} s")
    results["sweeps"] = sweeps


async def run(ctx: Context, results: dict[str, Any]) -> None:
    """10,000 leases of 2,000 users (--quick: 2,000 of 400)."""
    users, leases = (400, 2000) if ctx.quick else (2000, 10000)
    results.update(users=users, leases=leases)
    platform = bench_platform(users=users, cpus=30000, gpus=0, kernels=None)
    server = RedisServer(ctx.workdir / "redis-scale")
    server.start()
    try:
        info = sync_redis.Redis(port=server.port)
        before = int(info.info("memory")["used_memory"])
        clock = Clock(time.time())
        async with scheduler_on(server.url, platform, clock=clock) as scheduler:
            await _measure(scheduler, clock, info, before, ctx, results)
        info.close()
    finally:
        server.stop()


async def _measure(scheduler: Scheduler, clock: Clock, info: sync_redis.Redis, before: int,
                   ctx: Context, results: dict[str, Any]) -> None:  # fmt: skip
    users, leases = results["users"], results["leases"]
    with ctx.undisturbed():
        seconds, reports = await _make_leases(scheduler, clock, users=users, leases=leases)
        results["admit_only"] = {"concurrency": 50, "seconds": round(seconds, 2),
                                 "per_s": round(leases / seconds, 1)}  # fmt: skip
        progress(f"scale: {leases} leases admitted in {seconds:.1f} s")
        results["activity_batch_s"], _ = await _timed(scheduler.report_activity(reports))
        after = int(info.info("memory")["used_memory"])
        results["redis_bytes_per_lease"] = round((after - before) / leases)
        results["redis_used_memory_mb"] = round(after / 2**20, 1)
        await _sweeps(scheduler, clock, results)
