"""The scheduler as one object: admission, leases and pool status over one Redis client.

The HTTP app (:mod:`scheduler.app`) and the tests use this; it holds no global state, so a
test builds one with its own Redis, pools, kernelspecs, quotas and clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from redis.asyncio import Redis

from kernelfleet.config import PlatformConfig, Quotas
from kernelfleet.kernelspecs.spec import KernelSpec

from . import keys
from .admission import Admitter
from .leases import LeaseStore
from .pools import Pool, from_milli
from .store import unavailable_as


@dataclass(frozen=True)
class PoolStatus:
    """A pool's capacity and what its leases use now."""

    pool: Pool
    used: dict[str, float | int]
    kernels: int
    states: dict[str, int]

    def as_json(self) -> dict[str, object]:
        """The ``GET /v1/pools`` entry (docs/contracts.md)."""
        return {
            "name": self.pool.name,
            "capacity": self.pool.capacity(),
            "used": self.used,
            "kernels": self.kernels,
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


class Scheduler:
    """Admission, leases and pool status of one kernelfleet platform."""

    def __init__(
        self,
        redis: Redis,
        *,
        pools: Mapping[str, Pool],
        kernelspecs: Mapping[str, KernelSpec],
        quotas: Quotas,
        location: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.pools = pools
        self.location = location
        self.admitter = Admitter(
            redis,
            pools=pools,
            kernelspecs=kernelspecs,
            quotas=quotas,
            location=location,
            clock=clock,
        )
        self.leases = LeaseStore(redis, location=location)

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
    ) -> Scheduler:
        """A scheduler with the quotas of kernelfleet.yaml."""
        return cls(
            redis,
            pools=pools,
            kernelspecs=kernelspecs,
            quotas=platform.quotas,
            location=location,
            clock=clock,
        )

    async def ping(self) -> None:
        """Raise RedisUnavailable unless Redis answers."""
        with unavailable_as(self.location):
            await self.redis.ping()

    async def pool_status(self) -> list[PoolStatus]:
        """Every pool with its usage, in one round trip."""
        names = list(self.pools)
        with unavailable_as(self.location):
            pipe = self.redis.pipeline(transaction=False)
            for name in names:
                pipe.hgetall(keys.pool_usage(name))
                pipe.hgetall(keys.pool_states(name))
            rows = await pipe.execute()
        result = []
        for i, name in enumerate(names):
            usage, states = rows[2 * i], rows[2 * i + 1]
            result.append(
                PoolStatus(
                    pool=self.pools[name],
                    used=_usage(usage),
                    kernels=int(usage.get("kernels", 0)),
                    states={state: int(n) for state, n in states.items() if int(n) > 0},
                )
            )
        return result
