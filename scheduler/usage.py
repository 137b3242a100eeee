"""What a user holds and has used, against their quota; GPU-hours in the rolling 24 hours.

GPU time is accounted in Redis as the leases run (see :mod:`scheduler.lua`): each user has
a sorted set of running GPU leases (by start time) and one of GPU leases that ended in the
last 24 hours (by end time, trimmed as they age out). GPU-seconds in the window are the
ended leases' overlap with it plus the running leases' time in it - one script computes it
for both the admission check and the reports here.

A user's groups (which pick their quota, see :mod:`scheduler.quotas`) are what their last
admission request said; for users who never asked, the ``users`` of kernelfleet.yaml.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from kernelfleet.config import Quota, Quotas

from . import keys, lua
from .leases import GPU_WINDOW_S
from .pools import Pool, from_milli
from .quotas import effective_quota
from .store import unavailable_as


@dataclass(frozen=True)
class Usage:
    """A user's quota, what they hold now, GPU-hours used in the window, and waiting requests."""

    user: str
    groups: list[str]
    admin: bool
    quota: Quota
    kernels: int
    cpus: float
    memory: int
    gpus: int
    gpu_hours: float
    queued: int


@dataclass(frozen=True)
class OverGpuHours:
    """A user whose GPU-hours in the window reached their quota, and their GPU kernels."""

    user: str
    used_s: float
    limit_s: int
    kernel_ids: list[str]


class UsageReader:
    """Reads users' usage. ``known_groups``: user -> groups from kernelfleet.yaml."""

    def __init__(
        self,
        redis: Redis,
        *,
        pools: Mapping[str, Pool],
        quotas: Quotas,
        location: str,
        known_groups: Mapping[str, Sequence[str]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._pools = pools
        self._quotas = quotas
        self._location = location
        self._known_groups = dict(known_groups or {})
        self._clock = clock
        self._gpu_seconds = redis.register_script(lua.GPU_SECONDS)

    async def gpu_seconds(self, user: str) -> float:
        """GPU-seconds ``user`` held in the last 24 hours (running kernels included)."""
        script_keys = keys.ScriptKeys.list_for("-", user=user, pool="-")
        args = [repr(round(self._clock(), 3)), GPU_WINDOW_S]
        with unavailable_as(self._location):
            return float(await self._gpu_seconds(keys=script_keys, args=args))

    async def of_user(self, user: str, *, groups: Sequence[str] | None = None) -> Usage:
        """``user``'s usage against the quota of ``groups`` (default: as last seen)."""
        with unavailable_as(self._location):
            pipe = self._redis.pipeline(transaction=False)
            pipe.hgetall(keys.user_usage(user))  # with the profile of their last request
            pipe.scard(keys.user_queued(user))
            held, queued = await pipe.execute()
        if groups is None:
            stored = held.get("groups")
            groups = json.loads(stored) if stored else self._known_groups.get(user, [])
        gpu_seconds = await self.gpu_seconds(user)
        return Usage(
            user=user,
            groups=sorted(set(groups)),
            admin=held.get("admin") == "1",
            quota=effective_quota(self._quotas, user, groups),
            kernels=int(held.get("kernels", 0)),
            cpus=from_milli(int(held.get("cpus_milli", 0))),
            memory=int(held.get("memory", 0)),
            gpus=int(held.get("gpus", 0)),
            gpu_hours=round(gpu_seconds / 3600, 3),
            queued=int(queued),
        )

    async def over_gpu_hours(self) -> list[OverGpuHours]:
        """Users holding GPU kernels whose GPU-hours reached the quota they were admitted with."""
        by_user: dict[str, tuple[int, list[str]]] = {}
        with unavailable_as(self._location):
            for pool in self._pools.values():
                if pool.gpus == 0:
                    continue
                kernel_ids = sorted(await self._redis.smembers(keys.pool_leases(pool.name)))
                pipe = self._redis.pipeline(transaction=False)
                for kernel_id in kernel_ids:
                    pipe.hmget(keys.lease(kernel_id), ["user", "gpus", "gpu_seconds_limit"])
                rows = await pipe.execute() if kernel_ids else []
                for kernel_id, (user, gpus, limit) in zip(kernel_ids, rows, strict=True):
                    if user is None or int(gpus or 0) == 0 or int(limit or -1) < 0:
                        continue
                    known_limit, ids = by_user.get(user, (int(limit), []))
                    by_user[user] = (min(known_limit, int(limit)), [*ids, kernel_id])
        over = []
        for user, (limit, kernel_ids) in sorted(by_user.items()):
            used = await self.gpu_seconds(user)
            if used >= limit:
                over.append(OverGpuHours(user=user, used_s=used, limit_s=limit,
                                         kernel_ids=kernel_ids))  # fmt: skip
        return over
