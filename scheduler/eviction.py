"""Eviction: the sweep that warns and stops idle kernels, and the record of what it stopped.

Every ``eviction_interval_s`` (:mod:`scheduler.loops`) :meth:`Evictor.sweep` reads the live
leases (one pipelined read), decides each with :mod:`scheduler.eviction_policy`, and:

- **warns**: ``POST /kernelfleet/kernels/{id}/notice`` on Enterprise Gateway, which writes a
  ``stream`` (stderr) message on the kernel's IOPub channel to every connected client; the
  warning is remembered in ``kf:evict:warned`` so it is sent once per idle stretch;
- **evicts**: ``DELETE /api/kernels/{id}`` on EG, then releases the lease (reason ``idle``,
  ``max_lifetime`` or ``pressure``; the queue's head gets the room at once), appends a record
  to ``kf:evictions`` (capped at :data:`KEEP_RECORDS`), counts it in
  ``evictions_total{reason}`` and ``evicted_gpu_hours_total``, and leaves a note for the
  owner's next kernel start in ``kf:evict:notes``;
- **greets**: a user with a note who has a kernel started after the eviction gets the note
  on that kernel (the gateway shows it to the first client that connects), once.

One failing kernel never stops a sweep: it is logged, counted, and tried next sweep.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Protocol

from redis.asyncio import Redis

from kernelfleet.kernelspecs.spec import KernelSpec

from . import eviction_messages as text
from . import keys
from .errors import GatewayUnavailable
from .eviction_policy import (
    PRESSURE_GRACE_S,
    PRESSURE_WARNING_S,
    Verdict,
    Warning_,
    decide,
    decide_pressure,
    pressure_victim,
)
from .leases import Lease
from .service import Scheduler
from .store import unavailable_as
from .warm import WARM_USER

log = logging.getLogger(__name__)

#: Eviction records kept in ``kf:evictions``.
KEEP_RECORDS = 1000


class NoticeGateway(Protocol):
    """What eviction needs from Enterprise Gateway."""

    async def shutdown(self, kernel_id: str) -> None: ...

    async def notice(self, kernel_id: str, text: str) -> int: ...


@dataclass(frozen=True)
class Eviction:
    """One stopped kernel, as ``kernelfleet evictions`` lists it."""

    kernel_id: str
    user: str
    kernelspec: str
    pool: str
    reason: str
    at: float
    idle_s: float
    gpus: int
    gpu_hours_freed: float  # GPU-hours the kernel held while idle, given back to the pool

    @classmethod
    def of(cls, lease: Lease, verdict: Verdict, *, at: float) -> Eviction:
        idle_s = round(verdict.idle_s, 3)
        return cls(lease.kernel_id, lease.user, lease.kernelspec, lease.pool,
                   verdict.reason or "idle", at, idle_s, lease.gpus,
                   round(lease.gpus * idle_s / 3600, 4))  # fmt: skip


class EvictionStore:
    """Warnings sent, eviction records and next-start notes in Redis."""

    def __init__(self, redis: Redis, *, location: str) -> None:
        self._redis = redis
        self._location = location

    async def warnings(self) -> dict[str, Warning_]:
        with unavailable_as(self._location):
            raw = await self._redis.hgetall(keys.EVICT_WARNED)
        return {k: Warning_(**json.loads(v)) for k, v in raw.items()}

    async def warned(self, kernel_id: str, warning: Warning_) -> None:
        with unavailable_as(self._location):
            await self._redis.hset(keys.EVICT_WARNED, kernel_id, json.dumps(asdict(warning)))

    async def forget(self, kernel_ids: list[str]) -> None:
        if kernel_ids:
            with unavailable_as(self._location):
                await self._redis.hdel(keys.EVICT_WARNED, *kernel_ids)

    async def record(self, eviction: Eviction, note: str) -> None:
        """Append the record, leave the owner's note, forget the warning: one transaction."""
        with unavailable_as(self._location):
            pipe = self._redis.pipeline(transaction=True)
            pipe.lpush(keys.EVICTIONS, json.dumps(asdict(eviction)))
            pipe.ltrim(keys.EVICTIONS, 0, KEEP_RECORDS - 1)
            pipe.hset(
                keys.EVICT_NOTES, eviction.user, json.dumps({"text": note, "at": eviction.at})
            )
            pipe.hdel(keys.EVICT_WARNED, eviction.kernel_id)
            await pipe.execute()

    async def mark_stopped(self, kernel_id: str, reason: str) -> None:
        """Give the stopped lease the eviction's reason (EG's own release may have landed
        first, as ``released``)."""
        key = keys.stopped(kernel_id)
        with unavailable_as(self._location):
            if await self._redis.exists(key):
                await self._redis.hset(key, "stop_reason", reason)

    async def list(self, *, limit: int = 100, user: str | None = None) -> list[Eviction]:
        """The latest evictions, newest first (of ``user`` only, if given)."""
        with unavailable_as(self._location):
            rows = await self._redis.lrange(keys.EVICTIONS, 0, KEEP_RECORDS - 1)
        found = [Eviction(**json.loads(row)) for row in rows]
        return [e for e in found if user is None or e.user == user][:limit]

    async def notes(self) -> dict[str, tuple[str, float]]:
        with unavailable_as(self._location):
            raw = await self._redis.hgetall(keys.EVICT_NOTES)
        return {user: (n["text"], float(n["at"])) for user, n in
                ((u, json.loads(v)) for u, v in raw.items())}  # fmt: skip

    async def take_note(self, user: str) -> bool:
        """Remove ``user``'s note; False if another replica took it first."""
        with unavailable_as(self._location):
            return bool(await self._redis.hdel(keys.EVICT_NOTES, user))


class Evictor:
    """Sweeps ``scheduler``'s leases against their kernelspecs' idle policies."""

    def __init__(
        self,
        scheduler: Scheduler,
        gateway: NoticeGateway,
        *,
        kernelspecs: Mapping[str, KernelSpec],
        pressure_grace_s: float = PRESSURE_GRACE_S,
        pressure_warning_s: float = PRESSURE_WARNING_S,
        exclusive_s: float | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.gateway = gateway
        self.kernelspecs = kernelspecs
        self.pressure_grace_s = pressure_grace_s
        self.pressure_warning_s = pressure_warning_s
        self.exclusive_s = exclusive_s
        self.store = EvictionStore(scheduler.redis, location=scheduler.location)

    async def _my_turn(self) -> bool:
        """With ``exclusive_s``, one sweep per that many seconds across scheduler replicas
        (so a kernel is warned once, not once per replica)."""
        if self.exclusive_s is None:
            return True
        with unavailable_as(self.scheduler.location):
            took = await self.scheduler.redis.set(
                keys.lock("evictions"), "1", nx=True, px=int(self.exclusive_s * 1000)
            )
        return bool(took)

    async def sweep(self) -> list[Eviction]:
        """One sweep: decide, warn, evict, greet. Returns the evictions it made."""
        if not await self._my_turn():
            return []
        now = self.scheduler.clock()
        leases = await self.scheduler.leases.list()
        warned = await self.store.warnings()
        verdicts = await self._verdicts(leases, warned, now)
        evicted = []
        for lease, verdict in verdicts:
            try:
                if verdict.action == "warn":
                    await self._warn(lease, verdict, now)
                elif verdict.action == "evict":
                    eviction = await self._evict(lease, verdict, now)
                    if eviction is not None:
                        evicted.append(eviction)
            except Exception:  # one kernel never stops the sweep; tried again next sweep
                log.exception("eviction sweep: kernel %s failed", lease.kernel_id)
                self.scheduler.metrics.loop_errors.labels(loop="evictions").inc()
        live = {lease.kernel_id for lease in leases}
        cancelled = [k for k in warned if k not in live or _cancelled(k, warned, verdicts)]
        await self.store.forget(cancelled)
        await self._greet(leases)
        return evicted

    async def _verdicts(
        self, leases: list[Lease], warned: dict[str, Warning_], now: float
    ) -> list[tuple[Lease, Verdict]]:
        verdicts = []
        # Warm kernels are idle by design and belong to nobody: the warm pool's target
        # (0 while users wait for the pool) decides how many stay, not eviction.
        leases = [lease for lease in leases if lease.user != WARM_USER]
        for lease in leases:
            spec = self.kernelspecs.get(lease.kernelspec)
            if spec is not None:
                verdicts.append(
                    (lease, decide(lease, spec, now=now, warned=warned.get(lease.kernel_id)))
                )
        decided = {lease.kernel_id for lease, v in verdicts if v.action != "keep" or v.reason}
        for pool in await self._pressed_pools():
            candidates = [lease for lease in leases
                          if lease.pool == pool and lease.kernel_id not in decided]  # fmt: skip
            pending = [c for c in candidates if _pressure_warned(c, warned.get(c.kernel_id))]
            victim = (
                pending[0]
                if pending
                else pressure_victim(candidates, now=now, grace_s=self.pressure_grace_s)
            )
            if victim is not None:
                verdict = decide_pressure(victim, now=now, warned=warned.get(victim.kernel_id),
                                          warning_s=self.pressure_warning_s)  # fmt: skip
                verdicts = [
                    (lease, v) for lease, v in verdicts if lease.kernel_id != victim.kernel_id
                ]
                verdicts.append((victim, verdict))
        return verdicts

    async def _pressed_pools(self) -> list[str]:
        """Pools where someone waits (a request queues only when the pool has no room)."""
        return [s.pool.name for s in await self.scheduler.pool_status() if s.queued]

    async def _warn(self, lease: Lease, verdict: Verdict, now: float) -> None:
        assert verdict.reason is not None and verdict.deadline is not None
        message = text.warning(reason=verdict.reason, kernelspec=lease.kernelspec,
                               gpus=lease.gpus, idle_s=verdict.idle_s,
                               in_s=verdict.deadline - now)  # fmt: skip
        try:
            await self.gateway.notice(lease.kernel_id, message)
        except GatewayUnavailable as e:  # warned next sweep; never evicted unwarned
            log.warning("could not warn kernel %s of %s: %s", lease.kernel_id, lease.user,
                        e.log_message)  # fmt: skip
            return
        activity = lease.created if verdict.reason == "max_lifetime" else lease.last_activity
        await self.store.warned(
            lease.kernel_id, Warning_(activity, verdict.reason, verdict.deadline)
        )
        self.scheduler.metrics.eviction_warnings.labels(reason=verdict.reason).inc()
        log.info("warned kernel %s of %s: %s eviction at %.0f", lease.kernel_id, lease.user,
                 verdict.reason, verdict.deadline)  # fmt: skip

    async def _evict(self, lease: Lease, verdict: Verdict, now: float) -> Eviction | None:
        try:
            await self.gateway.shutdown(lease.kernel_id)
        except GatewayUnavailable as e:
            log.warning("could not evict kernel %s of %s: %s", lease.kernel_id, lease.user,
                        e.log_message)  # fmt: skip
            return None
        eviction = Eviction.of(lease, verdict, at=now)
        if not await self.scheduler.release(lease.kernel_id, reason=eviction.reason):
            await self.store.mark_stopped(lease.kernel_id, eviction.reason)
        note = text.stopped(reason=eviction.reason, kernelspec=lease.kernelspec, at=now,
                            idle_s=eviction.idle_s)  # fmt: skip
        await self.store.record(eviction, note)
        metrics = self.scheduler.metrics
        metrics.evictions.labels(reason=eviction.reason).inc()
        metrics.evicted_gpu_hours.labels(reason=eviction.reason).inc(eviction.gpu_hours_freed)
        log.warning("evicted kernel %s of %s (%s, idle %.0f s)", lease.kernel_id, lease.user,
                    eviction.reason, eviction.idle_s)  # fmt: skip
        return eviction

    async def _greet(self, leases: list[Lease]) -> None:
        """Hand each user's note to their first kernel started after the eviction."""
        notes = await self.store.notes()
        if not notes:
            return
        newest: dict[str, Lease] = {}  # one pass over the leases, not one per note
        for lease in leases:
            if lease.user in notes:
                known = newest.get(lease.user)
                if known is None or lease.created > known.created:
                    newest[lease.user] = lease
        for user, (note, at) in notes.items():
            lease = newest.get(user)
            if lease is None or lease.created <= at:
                continue
            kernel_id = lease.kernel_id
            if not await self.store.take_note(user):
                continue
            try:
                await self.gateway.notice(kernel_id, note)
            except GatewayUnavailable as e:  # a note is a courtesy: not retried
                log.info("could not pass the eviction note to %s: %s", user, e.log_message)


def _cancelled(
    kernel_id: str, warned: dict[str, Warning_], verdicts: list[tuple[Lease, Verdict]]
) -> bool:
    """Whether a warned kernel is no longer on its way out (it ran a cell, or got busy)."""
    for lease, verdict in verdicts:
        if lease.kernel_id == kernel_id:
            return verdict.action == "keep" and verdict.reason is None
    return True


def _pressure_warned(lease: Lease, warning: Warning_ | None) -> bool:
    return (
        warning is not None
        and warning.reason == "pressure"
        and (warning.activity == lease.last_activity)
    )
