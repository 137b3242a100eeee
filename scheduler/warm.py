"""Warm-pool targets: how many pre-started, unowned kernels of each kernelspec EG keeps ready.

Each kernelspec's ``warm_target`` in spec.yaml is the default. Ops pin another value at run
time (``kernelfleet warm set python-gpu 2``, ``PUT /v1/warm-pools/{kernelspec}``), kept in
Redis (``kf:warm:targets``, kernelspec -> target) so every scheduler replica and restart
agrees; ``DELETE`` goes back to the spec's value. A target never exceeds what the
kernelspec's pool could hold (its GPUs, CPUs or memory divided by one kernel's share), so a
mistyped ``warm set python-gpu 20`` cannot claim more than the pool has.

A kernelspec with ``warm_auto: {min, max, cold_start, window}`` and no pinned value gets
:func:`auto_target` from the kernels started in the last ``window``.

Not built yet (see docs/scheduler.md, "Warm pools"): EG's loop that keeps the pool at the
target, warm leases and claims.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis

from kernelfleet.kernelspecs.spec import KernelSpec, WarmAuto

from . import keys
from .errors import SchedulerError
from .leases import LeaseStore
from .pools import Pool
from .store import unavailable_as


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
    source: Literal["spec", "manual", "auto"]
    spec_target: int
    most: int


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
        """Kernels started per kernelspec within each one's auto window (live and stopped)."""
        autos = {n: s.warm_auto for n, s in self._kernelspecs.items() if s.warm_auto}
        if not autos or self._leases is None:
            return {}
        now = self._clock()
        leases = await self._leases.list() + await self._leases.list(state="stopped")
        counts: dict[str, int] = {}
        for lease in leases:
            auto = autos.get(lease.kernelspec)
            if auto is not None and lease.created >= now - auto.window:
                counts[lease.kernelspec] = counts.get(lease.kernelspec, 0) + 1
        return counts

    async def all(self) -> list[WarmTarget]:
        """Every kernelspec's target, by name."""
        with unavailable_as(self._location):
            pinned = await self._redis.hgetall(keys.WARM_TARGETS)
        starts = await self._recent_starts()
        return [self._target(spec, pinned.get(name), starts.get(name, 0))
                for name, spec in sorted(self._kernelspecs.items())]  # fmt: skip

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
