"""The scheduler as one object: admission, queues, leases, activity and usage over one Redis.

The HTTP app (:mod:`scheduler.app`), the background loops (:mod:`scheduler.loops`) and the
tests use this; it holds no global state, so a test builds one with its own Redis, pools,
kernelspecs, quotas and clock. It ties the parts together where one event has several
consequences: a release frees room, so the head of that pool's queue is admitted at once;
a request that leaves a queue may unblock the ones behind it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from kernelfleet.config import PlatformConfig, Quotas
from kernelfleet.kernelspecs.spec import KernelSpec

from . import keys, messages
from .activity import ActivityRecorder, Applied, Report
from .admission import Admission, Admitter, Queued, kernel_env
from .errors import (
    QueueLeft,
    QueueTimedOut,
    RedisUnavailable,
    SchedulerError,
    UnknownAdmission,
    UnknownKernelspec,
)
from .leases import LIVE_STATES, Lease, LeaseStore
from .metrics import SchedulerMetrics
from .migrate import migrate
from .pools import Pool, from_milli
from .queue import HEARTBEAT_TIMEOUT_S, Entry, Outcome, Queue
from .store import unavailable_as
from .usage import UsageReader

log = logging.getLogger(__name__)

#: Longest a single ``GET /v1/admissions/{id}`` holds the request while it waits.
MAX_POLL_S = 25.0
_POLL_SLICE_S = 0.5  # re-read Redis this often while waiting (other replicas may promote)


@dataclass(frozen=True)
class PoolStatus:
    """A pool's capacity, what its leases use now, and how many requests wait for it."""

    pool: Pool
    used: dict[str, float | int]
    kernels: int
    states: dict[str, int]
    queued: int = 0

    def as_json(self) -> dict[str, object]:
        """The ``GET /v1/pools`` entry (docs/contracts.md)."""
        return {
            "name": self.pool.name,
            "capacity": self.pool.capacity(),
            "used": self.used,
            "kernels": self.kernels,
            "states": self.states,
            "queued": self.queued,
            "simulated_gpus": self.pool.simulated_gpus,
            "cost_per_hour": self.pool.cost_per_hour,
            "overcommit": self.pool.overcommit,
        }


def _usage(fields: dict[str, str]) -> dict[str, float | int]:
    return {
        "cpus": from_milli(int(fields.get("cpus_milli", 0))),
        "memory": int(fields.get("memory", 0)),
        "gpus": int(fields.get("gpus", 0)),
    }


class Notifier:
    """Wakes every waiter at once when something changed (a broadcast event)."""

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    def _current(self) -> asyncio.Event:
        if self._event is None:
            self._event = asyncio.Event()
        return self._event

    def notify(self) -> None:
        """Wake everyone waiting now."""
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self, timeout_s: float) -> None:
        """Until notified or ``timeout_s`` passed."""
        try:
            await asyncio.wait_for(self._current().wait(), max(0.0, timeout_s))
        except asyncio.TimeoutError:  # builtin TimeoutError from 3.11 on
            pass


class Scheduler:
    """Admission, queues, leases, activity and usage of one kernelfleet platform.

    ``clock`` gives unix seconds for every decision (tests pass a fake one);
    ``max_wait_s`` bounds queue waits (kernelfleet.yaml's ``kernel_launch_timeout``);
    ``known_groups`` are the users' groups from kernelfleet.yaml, used for users who never
    asked for a kernel (their quota in ``GET /v1/users/{user}/usage``).
    """

    def __init__(
        self,
        redis: Redis,
        *,
        pools: Mapping[str, Pool],
        kernelspecs: Mapping[str, KernelSpec],
        quotas: Quotas,
        location: str,
        clock: Callable[[], float] = time.time,
        max_wait_s: float = 60.0,
        heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
        known_groups: Mapping[str, Sequence[str]] | None = None,
        metrics: SchedulerMetrics | None = None,
    ) -> None:
        self.redis = redis
        self.pools = pools
        self.location = location
        self.clock = clock
        self.metrics = metrics or SchedulerMetrics()
        self.notifier = Notifier()
        self.admitter = Admitter(
            redis, pools=pools, kernelspecs=kernelspecs, quotas=quotas, location=location,
            clock=clock, max_wait_s=max_wait_s,
        )  # fmt: skip
        self.leases = LeaseStore(redis, location=location, clock=clock)
        self.queue = Queue(redis, pools=pools, location=location, clock=clock,
                           heartbeat_timeout_s=heartbeat_timeout_s)  # fmt: skip
        self.activity = ActivityRecorder(redis, location=location, clock=clock)
        self.usage = UsageReader(redis, pools=pools, quotas=quotas, location=location,
                                 known_groups=known_groups, clock=clock)  # fmt: skip
        self._layout_checked = False

    @classmethod
    def from_config(
        cls,
        redis: Redis,
        platform: PlatformConfig,
        *,
        pools: Mapping[str, Pool],
        kernelspecs: Mapping[str, KernelSpec],
        location: str,
        clock: Callable[[], float] = time.time,
        metrics: SchedulerMetrics | None = None,
    ) -> Scheduler:
        """A scheduler with the quotas, users and launch timeout of kernelfleet.yaml."""
        return cls(
            redis, pools=pools, kernelspecs=kernelspecs, quotas=platform.quotas,
            location=location, clock=clock, max_wait_s=float(platform.kernel_launch_timeout),
            known_groups={name: user.groups for name, user in platform.users.items()},
            metrics=metrics,
        )  # fmt: skip

    async def ping(self) -> None:
        """Raise RedisUnavailable unless Redis answers."""
        with unavailable_as(self.location):
            await self.redis.ping()

    async def ensure_layout(self) -> None:
        """Bring Redis data an older scheduler wrote up to this one's layout, once per
        process (:mod:`scheduler.migrate`); RedisUnavailable while Redis is down."""
        if self._layout_checked:
            return
        with unavailable_as(self.location):
            await migrate(self.redis)
        self._layout_checked = True

    # -- admission ---------------------------------------------------------------------------

    async def admit(
        self, *, kernel_id: str, user: str, groups: list[str], kernelspec: str,
        admin: bool = False, wait_s: float = 0.0,
    ) -> Admission | Queued:  # fmt: skip
        """Admit, queue (``wait_s`` > 0 and the pool is full) or raise; counted in metrics."""
        start = time.perf_counter()
        try:
            decision = await self.admitter.admit(
                kernel_id=kernel_id, user=user, groups=groups, kernelspec=kernelspec,
                admin=admin, wait_s=wait_s,
            )  # fmt: skip
        except SchedulerError as e:
            kind = "error" if isinstance(e, RedisUnavailable) else "refused"
            self.metrics.admission(kind, e.code)
            log.info("refused kernel %s of %s (%s): %s", kernel_id, user, kernelspec,
                     e.log_message)  # fmt: skip
            raise
        finally:
            self.metrics.decisions.observe(time.perf_counter() - start)
        if isinstance(decision, Queued):
            self.metrics.admission("queued", "pool_full")
        else:
            self.metrics.admission("admitted", "new" if decision.created else "existing")
            self.leases.remember(kernel_id, user=user, pool=decision.lease.pool)
        return decision

    async def admission(self, kernel_id: str, *, wait_s: float = 0.0) -> Admission | Queued:
        """Where the admission of ``kernel_id`` stands; waits up to ``wait_s`` while queued.

        Admitted: its lease. Waiting: its place (each call counts as the client still
        waiting). Refused at the head, timed out or left: the error saying why.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + min(max(wait_s, 0.0), MAX_POLL_S)
        while True:
            decision = await self._admission_now(kernel_id)
            remaining = end - loop.time()
            if isinstance(decision, Admission) or remaining <= 0:
                return decision
            await self.notifier.wait(min(_POLL_SLICE_S, remaining))

    async def _admission_now(self, kernel_id: str) -> Admission | Queued:
        lease = await self.leases.get(kernel_id)
        if lease is None:
            entry = await self.queue.entry(kernel_id, touch=True)
            if entry is None:
                raise UnknownAdmission(messages.unknown_admission(kernel_id))
            if entry.state == "waiting":
                return Queued(kernel_id=kernel_id, pool=entry.pool, position=entry.position,
                              deadline=entry.deadline)  # fmt: skip
            if entry.state == "admitted":
                # Admitted between the two reads (PROMOTE writes the lease and the entry at
                # once): the lease is there now, unless it has been released since.
                lease = await self.leases.get(kernel_id)
            if lease is None:
                raise await self._outcome_error(entry)
        return Admission(lease=lease, env=kernel_env(lease), created=False)

    async def _outcome_error(self, entry: Entry) -> SchedulerError:
        """Why a request that left the queue without a lease did not get one."""
        spec = self.admitter.kernelspecs.get(entry.kernelspec)
        if spec is None:  # removed from the kernelspecs since the request queued
            known = sorted(self.admitter.kernelspecs)
            return UnknownKernelspec(messages.unknown_kernelspec(entry.kernelspec, known))
        if entry.state == "refused":
            f = entry.fields
            reply = [f.get("reason", "quota"), f.get("field", "kernels"), f.get("used", "0"),
                     f.get("limit", "0"), f.get("queued", "0")]  # fmt: skip
            return self.admitter.refusal(reply, spec=spec, groups=entry.groups, admin=entry.admin)
        if entry.state == "timed_out":
            return QueueTimedOut(await self._timeout_message(entry, spec))
        if entry.state == "admitted":
            return UnknownAdmission(messages.released_since(entry.kernel_id))
        return QueueLeft(messages.queue_left(pool=entry.pool))

    async def _timeout_message(self, entry: Entry, spec: KernelSpec) -> str:
        pool = self.pools.get(entry.pool)
        need = spec.resources.gpus
        with unavailable_as(self.location):
            free = int(await self.redis.scard(keys.pool_gpus_free(entry.pool)))
        alternative = self.admitter.alternative(entry.groups, admin=entry.admin) if need else None
        return messages.queue_timeout(
            pool=entry.pool, gpus_total=pool.gpus if pool else 0, gpus_free=free,
            need_gpus=need, position=entry.position, alternative=alternative,
        )  # fmt: skip

    async def withdraw(self, kernel_id: str) -> tuple[bool, bool]:
        """The caller gave up on ``kernel_id``: leave its queue, release a lease granted
        meanwhile. Returns (left the queue, released a lease)."""
        left = await self.queue.leave(kernel_id, state="left")
        if left is not None:
            self._record([left])
            await self.promote(left.pool)
        released = await self.release(kernel_id, reason="withdrawn")
        return left is not None, released

    # -- queues ------------------------------------------------------------------------------

    async def promote(self, pool: str) -> list[Outcome]:
        """Admit the heads of ``pool``'s queue that fit now; wake waiting clients."""
        outcomes = await self.queue.promote(pool)
        self._record(outcomes)
        return outcomes

    async def promote_all(self) -> list[Outcome]:
        """Promote every pool that has requests waiting."""
        outcomes: list[Outcome] = []
        for pool, waiting in (await self.queue.lengths()).items():
            if waiting:
                outcomes += await self.promote(pool)
        return outcomes

    async def expire_queues(self) -> list[Outcome]:
        """Time out and drop abandoned requests, then promote the pools they left."""
        outcomes = await self.queue.expire()
        self._record(outcomes)
        for pool in sorted({o.pool for o in outcomes}):
            await self.promote(pool)
        return outcomes

    def _record(self, outcomes: Iterable[Outcome]) -> None:
        for outcome in outcomes:
            self.metrics.waited(outcome.pool, outcome.decision, outcome.waited)
            if outcome.decision == "admitted":
                self.metrics.admission("admitted", "queue")
            elif outcome.decision == "refused":
                reason = "quota_exceeded" if outcome.reply[:1] == ["quota"] else "pool_full"
                self.metrics.admission("refused", reason)
            elif outcome.decision == "timed_out":
                self.metrics.admission("refused", "queue_timeout")
            else:
                self.metrics.admission("refused", "queue_left")
        if outcomes:
            self.notifier.notify()

    # -- leases ------------------------------------------------------------------------------

    def warm_claimed(self, lease: Lease) -> None:
        """A warm kernel became ``lease.user``'s (the Kubernetes backend relabels its pod)."""

    async def release(self, kernel_id: str, *, reason: str = "released") -> bool:
        """Release the lease of ``kernel_id``; the head of its pool's queue gets the room."""
        released = await self.leases.release(kernel_id, reason=reason)
        if released is None:
            return False
        if not released.waiting:  # counted right after the release, by the same script
            return True
        try:
            await self.promote(released.pool)
        except RedisUnavailable as e:  # the queue loop promotes once Redis is back
            log.warning("promoting pool %s after a release: %s", released.pool, e.log_message)
        return True

    async def report_activity(self, reports: Iterable[Report]) -> tuple[Applied, list[str]]:
        """Apply the gateway's activity reports; dead kernels release their leases.

        Returns what was applied and the kernel ids whose leases this released.
        """
        applied = await self.activity.apply(reports)
        released = [k for k in applied.dead if await self.release(k, reason="died")]
        for result in ("updated", "dead", "unknown"):
            count = len(getattr(applied, result))
            if count:
                self.metrics.activity.labels(result=result).inc(count)
        return applied, released

    async def pool_status(self) -> list[PoolStatus]:
        """Every pool with its usage and queue length, in one round trip."""
        names = list(self.pools)
        with unavailable_as(self.location):
            pipe = self.redis.pipeline(transaction=False)
            for name in names:
                pipe.hgetall(keys.pool_usage(name))  # lease states too
                pipe.zcard(keys.pool_queue(name))
            rows = await pipe.execute()
        result = []
        for i, name in enumerate(names):
            usage, queued = rows[2 * i], rows[2 * i + 1]
            states = {s: int(usage[s]) for s in LIVE_STATES if int(usage.get(s, 0)) > 0}
            result.append(
                PoolStatus(
                    pool=self.pools[name],
                    used=_usage(usage),
                    kernels=int(usage.get("kernels", 0)),
                    states={state: int(n) for state, n in states.items() if int(n) > 0},
                    queued=int(queued),
                )
            )
        return result
