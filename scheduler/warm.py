"""Warm pools: pre-started, unowned kernels of each kernelspec, kept ready by EG.

**Targets.** Each kernelspec's ``warm_target`` in spec.yaml is the default. Ops pin another
value at run time (``kernelfleet warm set python-gpu 2``, ``PUT /v1/warm-pools/{kernelspec}``),
kept in Redis (``kf:warm:targets``, kernelspec -> target) so every scheduler replica and restart
agrees; ``DELETE`` goes back to the spec's value. A target never exceeds what the
kernelspec's pool could hold (its GPUs, CPUs or memory divided by one kernel's share), so a
mistyped ``warm set python-gpu 20`` cannot claim more than the pool has. While users wait
in a pool's queue, its kernelspecs' targets read 0 (``source: "pressure"``): EG stops the
warm kernels there and their capacity goes to the users waiting.

A kernelspec with ``warm_auto: {min, max, cold_start, window}`` and no pinned value gets
:func:`auto_target` from the kernels users started in the last ``window``.

**Warm leases.** EG admits each warm kernel as :data:`WARM_USER` (``warm`` admissions): the
lease holds pool capacity (a warm GPU kernel holds its GPU) but no user's quota, and warm
admissions never queue or jump a queue. **Claims.** A user's start claims one
(:class:`WarmClaims`, the ``CLAIM`` script): the lease moves to the user atomically if their
quota allows one more such kernel, and its lifetime, idle time and GPU-hours count from then.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from redis.asyncio import Redis

from kernelfleet.kernelspecs.spec import KernelSpec, WarmAuto

from . import keys, lua
from .admission import Admission, Admitter, kernel_env, quota_limits
from .errors import SchedulerError, UnknownLease
from .leases import GPU_WINDOW_S, Lease, LeaseStore
from .pools import Pool
from .quotas import effective_quota
from .store import unavailable_as

#: The owner of warm leases. Not a user: the API refuses admissions for this name.
WARM_USER = "@warm"


class BadWarmTarget(SchedulerError):
    """A warm target that cannot be set (unknown kernelspec, negative, too large)."""

    status = 400
    code = "bad_warm_target"
    retryable = False


@dataclass(frozen=True)
class WarmTarget:
    """One kernelspec's warm target, where it comes from, and the most its pool can hold."""

    kernelspec: str
    pool: str
    target: int
    source: Literal["spec", "manual", "auto", "pressure"]
    spec_target: int
    most: int
    ready: int = 0  # warm kernels EG holds now (their leases), claimable or starting


def pool_room(spec: KernelSpec, pool: Pool) -> int:
    """How many kernels of ``spec`` the empty pool could hold."""
    resources = spec.resources
    limits = [pool.cpus / resources.cpus if resources.cpus else math.inf,
              pool.memory / resources.memory if resources.memory else math.inf,
              pool.gpus / resources.gpus if resources.gpus else math.inf]  # fmt: skip
    room = min(limits)
    return 0 if room == math.inf else int(room)


def auto_target(*, starts: int, auto: WarmAuto, most: int) -> int:
    """``ceil(starts / window × cold_start)`` within ``[min, max]`` and ``most``.

    Starts arriving while one cold start runs (Little's law): with that many kernels warm,
    a start rarely finds the pool empty while the background refill is under way.
    """
    wanted = math.ceil(starts / auto.window * auto.cold_start)
    return max(0, min(max(auto.min, min(wanted, auto.max)), most))


class WarmTargets:
    """Reads and sets warm targets in Redis against the loaded kernelspecs and pools."""

    def __init__(
        self,
        redis: Redis,
        *,
        kernelspecs: Mapping[str, KernelSpec],
        pools: Mapping[str, Pool],
        location: str,
        leases: LeaseStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._leases = leases
        self._clock = clock
        self._redis = redis
        self._kernelspecs = kernelspecs
        self._pools = pools
        self._location = location

    @classmethod
    def of(cls, scheduler: Any) -> WarmTargets:
        """The targets of a :class:`scheduler.service.Scheduler`'s kernelspecs and pools."""
        return cls(scheduler.redis, kernelspecs=scheduler.admitter.kernelspecs,
                   pools=scheduler.pools, location=scheduler.location,
                   leases=scheduler.leases, clock=scheduler.clock)  # fmt: skip

    def _spec(self, name: str) -> KernelSpec:
        spec = self._kernelspecs.get(name)
        if spec is None:
            known = ", ".join(sorted(self._kernelspecs))
            raise BadWarmTarget(f"There is no kernelspec {name!r}; known: {known}.")
        return spec

    def _target(self, spec: KernelSpec, pinned: str | None, starts: int = 0) -> WarmTarget:
        pool = self._pools.get(spec.pool)
        most = pool_room(spec, pool) if pool else 0
        if pinned is not None:
            target, source = int(pinned), "manual"
        elif spec.warm_auto is not None:
            target, source = auto_target(starts=starts, auto=spec.warm_auto, most=most), "auto"
        else:
            target, source = spec.warm_target, "spec"
        return WarmTarget(spec.name, spec.pool, min(target, most), source,  # type: ignore[arg-type]
                          spec.warm_target, most)  # fmt: skip

    async def _recent_starts(self) -> dict[str, int]:
        """Kernels users started per kernelspec within each one's auto window (live and
        stopped).

        Reads only the leases created inside the longest window (live ones by the created
        index, stopped ones by the stop index: a lease stops after it starts), not every
        lease: the gateway asks for the targets every few seconds.
        """
        autos = {n: s.warm_auto for n, s in self._kernelspecs.items() if s.warm_auto}
        if not autos:
            return {}
        now = self._clock()
        since = now - max(auto.window for auto in autos.values())
        fields = ("user", "kernelspec", "created")
        with unavailable_as(self._location):
            # the created index holds whole seconds: from the second `since` falls in
            live = await self._redis.zrangebyscore(keys.LEASES, math.floor(since), "+inf")
            stopped = await self._redis.zrangebyscore(keys.STOPPED, since, "+inf")
            pipe = self._redis.pipeline(transaction=False)
            for kernel_id in live:
                pipe.hmget(keys.lease(kernel_id), fields)
            for kernel_id in stopped:
                pipe.hmget(keys.stopped(kernel_id), fields)
            rows = await pipe.execute() if live or stopped else []
        counts: dict[str, int] = {}
        for user, kernelspec, created in rows:
            if created is None or user == WARM_USER:
                continue  # gone meanwhile; refills are not demand
            auto = autos.get(kernelspec)
            if auto is not None and float(created) >= now - auto.window:
                counts[kernelspec] = counts.get(kernelspec, 0) + 1
        return counts

    async def all(self) -> list[WarmTarget]:
        """Every kernelspec's target, by name, with the warm kernels it has now."""
        pools = sorted(self._pools)
        with unavailable_as(self._location):
            pipe = self._redis.pipeline(transaction=False)
            pipe.hgetall(keys.WARM_TARGETS)
            for pool in pools:
                pipe.zcard(keys.pool_queue(pool))
            replies = await pipe.execute()
        pinned, queued = replies[0], dict(zip(pools, replies[1:], strict=True))
        starts = await self._recent_starts()
        ready = await self._ready()
        found = []
        for name, spec in sorted(self._kernelspecs.items()):
            target = self._target(spec, pinned.get(name), starts.get(name, 0))
            if queued.get(spec.pool):  # users wait for this pool: they come first
                target = replace(target, target=0, source="pressure")
            found.append(replace(target, ready=ready.get(name, 0)))
        return found

    async def _ready(self) -> dict[str, int]:
        """Warm leases per kernelspec."""
        if self._leases is None:
            return {}
        counts: dict[str, int] = {}
        for lease in await self._leases.list(user=WARM_USER):
            counts[lease.kernelspec] = counts.get(lease.kernelspec, 0) + 1
        return counts

    async def set(self, kernelspec: str, target: int) -> WarmTarget:
        """Pin ``kernelspec``'s target; BadWarmTarget if negative or beyond its pool."""
        spec = self._spec(kernelspec)
        most = self._target(spec, None).most
        if target < 0 or target > most:
            raise BadWarmTarget(
                f"A warm target for {kernelspec} must be between 0 and {most} "
                f"(what pool {spec.pool} can hold), not {target}."
            )
        with unavailable_as(self._location):
            await self._redis.hset(keys.WARM_TARGETS, kernelspec, str(target))
        return self._target(spec, str(target))

    async def reset(self, kernelspec: str) -> WarmTarget:
        """Forget the pinned value: back to spec.yaml's ``warm_target``."""
        spec = self._spec(kernelspec)
        with unavailable_as(self._location):
            await self._redis.hdel(keys.WARM_TARGETS, kernelspec)
        return self._target(spec, None)


class WarmTaken(SchedulerError):
    """The kernel to claim is no longer warm (claimed by someone else, or another kind)."""

    status = 409
    code = "warm_taken"
    retryable = True


class WarmClaims:
    """Moves warm leases to the users who claim them (one ``CLAIM`` round trip)."""

    def __init__(
        self,
        redis: Redis,
        *,
        admitter: Admitter,
        pools: Mapping[str, Pool],
        location: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._admitter = admitter
        self._pools = pools
        self._location = location
        self._clock = clock
        self._script = redis.register_script(lua.CLAIM)

    async def claim(
        self, *, kernel_id: str, user: str, groups: list[str], kernelspec: str, admin: bool
    ) -> Admission:
        """Give the warm kernel ``kernel_id`` to ``user``, or raise why not.

        KernelspecForbidden / QuotaExceeded as a cold start would; WarmTaken if it is not a
        warm ``kernelspec`` kernel (any more); UnknownLease if it has no lease.
        """
        spec = self._admitter.kernelspec(kernelspec, groups, admin=admin)
        pool = self._pools[spec.pool]
        quota = effective_quota(self._admitter.quotas, user, groups)
        args = json.dumps({
            "kernel_id": kernel_id, "user": user, "kernelspec": spec.name,
            "warm_user": WARM_USER, "groups": json.dumps(sorted(set(groups))), "admin": admin,
            "now": round(self._clock(), 3), "window": GPU_WINDOW_S, "quota": quota_limits(quota),
        })  # fmt: skip
        script_keys = keys.ScriptKeys.list_for(kernel_id, user=user, pool=pool.name)
        script_keys += [keys.user_leases(WARM_USER), keys.user_usage(WARM_USER),
                        keys.user_gpu_running(WARM_USER)]  # fmt: skip
        with unavailable_as(self._location):
            reply = await self._script(keys=script_keys, args=[args])
        if reply[0] == "gone":
            raise UnknownLease(f"No live lease for kernel {kernel_id}.")
        if reply[0] == "taken":
            raise WarmTaken(f"Kernel {kernel_id} is not a warm {spec.name} kernel any more.")
        if reply[0] != "claimed":
            raise self._admitter.refusal(reply, spec=spec, groups=groups, admin=admin)
        lease = Lease.from_redis(dict(zip(reply[1::2], reply[2::2], strict=True)))
        return Admission(lease=lease, env=kernel_env(lease), created=False)
