"""Scheduler admission under concurrency, against a real Redis, with over-commit checks.

Two ways in, same workload:

- ``inprocess``: the scheduler's own ``Scheduler.admit`` (the Admitter's one Lua round trip
  to Redis, plus metrics) called by ``c`` concurrent tasks in this process. This is the
  figure the issue's target applies to: the decision itself, without HTTP.
- ``http``: ``POST /v1/admissions`` to a real ``python -m scheduler`` process, as the
  gateway calls it (``c`` concurrent connections; the client shares this machine's CPUs).

Workload: ``c`` workers loop; each first releases the lease it holds (if any), then asks to
admit a new kernel (fresh id) for a random one of the platform's users (200): python-cpu, or
for ml members every other time python-gpu. Pools are small enough that quotas and capacity
refuse many requests at 50 and 500 concurrent. In-process, each level's workers first make
half as many decisions unmeasured (a warm-up), then the measured ones, without stopping: the
measured window starts in the steady state, ``c`` requests in flight, and finds Redis grown
as a running scheduler's is (a fresh redis-server took about twice as long over its first
thousands of decisions). The warm-up starts with every worker's first request sent in the
same loop pass, the last answered after all of them: those first ``c`` latencies are
reported apart (``opening_p50_ms``, ``opening_max_ms``). An admission's latency is measured
around ``admit`` only; ``per_s`` counts decisions (admitted or refused) per second of the
measured window, releases included in that time. Releases are timed too (``release_p50_ms``,
``release_p99_ms``): in this closed loop each worker's cycle is its release plus its
admission, so ``concurrency / per_s`` is their sum and work taken out of one moves waiting
to the other.

Over-commits are counted twice: by a client-side ledger (what is held, counted up when an
admission is answered and down *before* its release is sent, so it can only under-count
what Redis holds: any excess over a capacity or quota is a real over-commit), and by
re-reading every live lease from Redis at the end (:func:`bench.scheduling.over_commits`).
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from kernelfleet.config import PlatformConfig, Quota
from scheduler.errors import SchedulerError
from scheduler.leases import Lease
from scheduler.pools import to_milli
from scheduler.quotas import effective_quota
from scheduler.service import Scheduler
from tests.support.redis_server import RedisServer

from .context import Context
from .machine import cpu_share, cpu_ticks
from .runtime import progress
from .scheduler_process import SchedulerProcess
from .scheduling import bench_platform, over_commits, scheduler_on, user_groups, user_name
from .stats import summarize

USERS = 200
LEVELS = (1, 50, 500)
DECISIONS = {"inprocess": {1: 2000, 50: 10000, 500: 20000}, "http": {1: 500, 50: 3000, 500: 5000}}
QUICK_DECISIONS = {"inprocess": {1: 300, 50: 2000, 500: 4000}, "http": {1: 200, 50: 600, 500: 1000}}

Decide = Callable[[str, str, list[str], str], Awaitable[tuple[str, Lease | None]]]
Release = Callable[[str], Awaitable[None]]


@dataclass
class Ledger:
    """What the clients hold, by pool and by user, and every limit it ever exceeded.

    While the workers run it only notes what happened, in order (an append: the checks
    would otherwise take CPU from the scheduler they measure, in this same process);
    :meth:`check` replays it afterwards.
    """

    scheduler: Scheduler
    platform: PlatformConfig
    # (+1 admitted / -1 releasing, pool, user, cpus_milli, gpus): only strings and numbers,
    # which the garbage collector stops tracking (leases kept here made its passes long)
    events: list[tuple[int, str, str, int, int]] = field(default_factory=list)

    def admitted(self, lease: Lease) -> None:
        """``lease`` was answered: held from now on."""
        self.events.append((1, lease.pool, lease.user, to_milli(lease.cpus), lease.gpus))

    def releasing(self, lease: Lease) -> None:
        """``lease`` is about to be released: no longer counted."""
        self.events.append((-1, lease.pool, lease.user, to_milli(lease.cpus), lease.gpus))

    def check(self) -> list[str]:
        """Every limit the held leases exceeded at some point, in the order it happened."""
        pool_cpus_milli: Counter[str] = Counter()
        pool_gpus: Counter[str] = Counter()
        user_kernels: Counter[str] = Counter()
        user_gpus: Counter[str] = Counter()
        quotas: dict[str, Quota] = {}
        violations = []
        for sign, name, user, cpus_milli, gpus in self.events:
            pool_cpus_milli[name] += sign * cpus_milli
            pool_gpus[name] += sign * gpus
            user_kernels[user] += sign
            user_gpus[user] += sign * gpus
            if sign < 0:
                continue
            pool = self.scheduler.pools[name]
            quota = quotas.get(user)
            if quota is None:
                groups = self.platform.users[user].groups
                quota = quotas[user] = effective_quota(self.platform.quotas, user, groups)
            if pool_cpus_milli[name] > pool.cpus_milli:
                violations.append(f"pool {name} CPUs over capacity")
            if pool_gpus[name] > pool.gpus:
                violations.append(f"pool {name} GPUs over capacity")
            if quota.kernels is not None and user_kernels[user] > quota.kernels:
                violations.append(f"user {user} over kernel quota")
            if quota.gpus is not None and user_gpus[user] > quota.gpus:
                violations.append(f"user {user} over GPU quota")
        return violations


@dataclass
class Tally:
    """Latencies and outcomes of one run: ``warmup`` decisions unmeasured, then the rest.

    ``window_began`` is called once, by the worker that claims the first measured decision.
    """

    remaining: int
    warmup: int = 0
    window_began: Callable[[], None] = lambda: None
    claimed: int = 0
    samples: list[float] = field(default_factory=list)
    releases: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    opening: list[float] = field(default_factory=list)  # the first decisions, sent at once

    def take(self) -> int | None:
        """Claim one more decision to make: its number (0 first); None when all are claimed."""
        if self.remaining <= 0:
            return None
        self.remaining -= 1
        claimed = self.claimed
        self.claimed += 1
        if claimed == self.warmup:
            self.window_began()
        return claimed


@lru_cache(maxsize=4)
def _people(users: int) -> tuple[tuple[str, list[str]], ...]:
    """Every simulated user's name and groups (made once, not per request)."""
    return tuple((user_name(i), user_groups(i)) for i in range(users))


async def _worker(seed: int, decide: Decide, release: Release, ledger: Ledger, tally: Tally,
                  concurrency: int) -> None:  # fmt: skip
    rng = random.Random(seed)
    people = _people(len(ledger.platform.users))
    held: Lease | None = None
    clock, warmup = time.perf_counter, tally.warmup
    # Kernel ids shaped like EG's (36 characters), unique: a uuid4 prefix of this worker's,
    # then a counter (uuid4() per request was ~6 us of this process's CPU per decision).
    prefix, made = str(uuid.uuid4())[:24], 0
    try:
        while (n := tally.take()) is not None:
            if held is not None:
                ledger.releasing(held)
                began = clock()
                await release(held.kernel_id)
                if n >= warmup:
                    tally.releases.append(clock() - began)
                held = None
            i = rng.randrange(len(people))
            spec = "python-gpu" if i % 2 and rng.random() < 0.5 else "python-cpu"
            made += 1
            user, groups = people[i]
            began = clock()
            outcome, lease = await decide(f"{prefix}{made:012x}", user, groups, spec)
            took = clock() - began
            if n >= warmup:
                tally.samples.append(took)
                tally.outcomes[outcome] += 1
            elif n < concurrency:
                tally.opening.append(took)
            if lease is not None:
                ledger.admitted(lease)
                held = lease
    finally:
        if held is not None:
            ledger.releasing(held)
            await release(held.kernel_id)


def in_process(scheduler: Scheduler) -> tuple[Decide, Release]:
    """Decide and release with ``Scheduler.admit`` / ``Scheduler.release``."""

    async def decide(kernel_id: str, user: str, groups: list[str], spec: str
                     ) -> tuple[str, Lease | None]:  # fmt: skip
        try:
            admission = await scheduler.admit(kernel_id=kernel_id, user=user, groups=groups,
                                              kernelspec=spec)  # fmt: skip
        except SchedulerError as e:
            return e.code, None
        lease = getattr(admission, "lease", None)
        return ("admitted", lease) if lease is not None else ("queued", None)

    async def release(kernel_id: str) -> None:
        await scheduler.release(kernel_id)

    return decide, release


async def measure(
    scheduler: Scheduler, platform: PlatformConfig, decide: Decide, release: Release, *,
    concurrency: int, decisions: int, warmup: int = 0, server_pid: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Run the workload once; its latency summary, outcomes, over-commits and CPU use
    (``server_pid``: the scheduler process answering over HTTP, to count its CPU too).

    The same ``concurrency`` workers first make ``warmup`` decisions, unmeasured, then the
    ``decisions`` measured, without a pause between: the measured window starts with
    ``concurrency`` requests in flight, as it goes on, not with all of them sent in one loop
    pass (how the warm-up starts; its first ``concurrency`` latencies are ``opening_*``).
    """
    ledger = Ledger(scheduler, platform)
    start: dict[str, Any] = {}

    def window_began() -> None:  # clocks read at once; Redis' over its own connection
        start.update(at=time.perf_counter(), clocks=_local_clocks(server_pid),
                     redis=asyncio.ensure_future(_redis_cpu_s(scheduler)))  # fmt: skip

    tally = Tally(warmup + decisions, warmup=warmup, window_began=window_began)
    await asyncio.gather(*(_worker(seed, decide, release, ledger, tally, concurrency)
                           for seed in range(concurrency)))  # fmt: skip
    wall = time.perf_counter() - start["at"]
    began = _CpuClocks(redis_s=await start["redis"], **start["clocks"])
    ended = _CpuClocks(redis_s=await _redis_cpu_s(scheduler), **_local_clocks(server_pid))
    spent = _cpu_spent(began, ended, decisions)
    problems = await over_commits(scheduler, platform)
    violations = ledger.check()
    result: dict[str, Any] = summarize(tally.samples, wall_s=wall)
    result.update(spent)
    releases = summarize(tally.releases)
    result.update(release_p50_ms=releases.get("p50_ms"), release_p99_ms=releases.get("p99_ms"))
    if tally.opening:
        opening = summarize(tally.opening)
        result.update(opening_p50_ms=opening.get("p50_ms"), opening_max_ms=opening.get("max_ms"))
    result.update(concurrency=concurrency, warmup=warmup, outcomes=dict(tally.outcomes),
                  over_commits=len(violations) + len(problems),
                  problems=(violations + problems)[:10])  # fmt: skip
    return result


@dataclass(frozen=True)
class _CpuClocks:
    redis_s: float  # Redis' main thread (where commands and scripts run)
    process_s: float  # this process
    server_s: float | None  # the scheduler process over HTTP
    machine: tuple[int, int, int] | None  # ticks: busy, steal, total


def _process_cpu_s(pid: int | None) -> float | None:
    """User plus system CPU seconds of process ``pid`` so far, from /proc; None if unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _redis_cpu_s(scheduler: Scheduler) -> float:
    """CPU seconds of Redis' main thread (where commands and scripts run) so far."""
    info = await scheduler.redis.info("cpu")
    if "used_cpu_user_main_thread" in info:
        return float(info["used_cpu_user_main_thread"] + info["used_cpu_sys_main_thread"])
    return float(info.get("used_cpu_user", 0.0) + info.get("used_cpu_sys", 0.0))


def _local_clocks(server_pid: int | None = None) -> dict[str, Any]:
    """This process' CPU seconds, the HTTP scheduler's, and the machine's ticks, now."""
    return {"process_s": time.process_time(), "server_s": _process_cpu_s(server_pid),
            "machine": cpu_ticks()}  # fmt: skip


def _cpu_spent(before: _CpuClocks, after: _CpuClocks, decisions: int) -> dict[str, Any]:
    """Where the CPU went during a run, in microseconds per decision (its release included):
    in Redis, in this process (in-process: the scheduler and the workers; over HTTP: the
    clients) and in the scheduler process answering over HTTP; and how busy the machine was
    in percent of all its CPUs (``steal_pct``: taken by the hypervisor for other guests).
    Which side is the bound, and what the rest of the machine took, read from one run."""
    spent: dict[str, Any] = {
        "redis_cpu_us": round((after.redis_s - before.redis_s) / decisions * 1e6, 1),
        "process_cpu_us": round((after.process_s - before.process_s) / decisions * 1e6, 1),
    }
    if before.server_s is not None and after.server_s is not None:
        spent["server_cpu_us"] = round((after.server_s - before.server_s) / decisions * 1e6, 1)
    spent.update(cpu_share(before.machine, after.machine))
    return spent


@contextmanager
def _frozen_heap() -> Iterator[None]:
    """Objects made before a measured run are out of the garbage collector's generations
    while it runs, as the scheduler process does with what its start-up made
    (``scheduler/__main__.py``): a full collection then walks only what the run made. This
    process holds ~275k objects of its own (other phases' results, every module the bench
    imports), and one full collection of them paused the loop for up to 180 ms."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def run(ctx: Context, results: dict[str, Any]) -> None:
    """Admission at 1, 50 and 500 concurrent, in-process and over HTTP."""
    plan = QUICK_DECISIONS if ctx.quick else DECISIONS
    platform = bench_platform(users=USERS, cpus=64, gpus=8)
    server = RedisServer(ctx.workdir / "redis-admission")
    server.start()
    try:
        results["inprocess"], results["http"] = {}, {}
        for level in LEVELS:
            server.flush()
            async with scheduler_on(server.url, platform) as scheduler:
                decide, release = in_process(scheduler)
                decisions = plan["inprocess"][level]
                with _frozen_heap(), ctx.undisturbed():
                    found = await measure(scheduler, platform, decide, release,
                                          concurrency=level, decisions=decisions,
                                          warmup=decisions // 2)  # fmt: skip
                results["inprocess"][str(level)] = found
                progress(f"admission in-process at {level}: p50 {found.get('p50_ms')} ms, "
                         f"p99 {found.get('p99_ms')} ms, {found.get('per_s')}/s, "
                         f"over-commits {found['over_commits']} (releases: p50 "
                         f"{found.get('release_p50_ms')} ms, "
                         f"p99 {found.get('release_p99_ms')} ms)")  # fmt: skip
        await _over_http(ctx, server, platform, plan["http"], results["http"])
    finally:
        server.stop()


async def _over_http(ctx: Context, server: RedisServer, platform: PlatformConfig,
                     plan: dict[int, int], results: dict[str, Any]) -> None:  # fmt: skip
    """The same workload through a real scheduler process's HTTP API."""
    async with SchedulerProcess.started(ctx.workdir / "scheduler", platform,
                                        redis_url=server.url) as process:  # fmt: skip
        for level in LEVELS:
            server.flush()
            async with scheduler_on(server.url, platform) as reader, process.client(level) as api:
                decide, release = api.decide, api.release
                with _frozen_heap(), ctx.undisturbed():
                    found = await measure(reader, platform, decide, release, concurrency=level,
                                          decisions=plan[level],
                                          server_pid=process.popen.pid)  # fmt: skip
            results[str(level)] = found
            progress(f"admission over HTTP at {level}: p50 {found.get('p50_ms')} ms, "
                     f"p99 {found.get('p99_ms')} ms, {found.get('per_s')}/s, "
                     f"over-commits {found['over_commits']}")  # fmt: skip
