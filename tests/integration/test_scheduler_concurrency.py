"""500 concurrent admissions (and then releases) from four scheduler replicas at one Redis:
no quota and no pool is ever over-committed, and every counter, GPU set and queue agrees
with the leases and requests that exist."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable

from kernelfleet.config import PlatformConfig
from kernelfleet.kernelspecs.spec import KernelSpec
from scheduler import keys
from scheduler.admission import Admission, Queued
from scheduler.errors import PoolFull, QuotaExceeded
from scheduler.leases import LIVE_STATES
from scheduler.pools import to_milli
from scheduler.service import Scheduler

GIB = 2**30
MakeScheduler = Callable[..., Scheduler]
KERNEL_QUOTA, GPU_QUOTA = 3, 2

PLATFORM = PlatformConfig.model_validate(
    {
        "pools": {
            "cpu": {"cpus": 40, "memory": "60Gi"},
            "gpu": {"cpus": 100, "memory": "400Gi", "gpus": 4, "simulated_gpus": True},
        },
        "quotas": {
            "default": {"kernels": KERNEL_QUOTA},
            "groups": {"ml": {"gpus": GPU_QUOTA, "cpus": 4}},
        },
    }
)


def _spec(name: str, pool: str, *, cpus: float, memory: int, gpus: int = 0) -> KernelSpec:
    return KernelSpec(
        name=name,
        display_name=name,
        pool=pool,
        resources={"cpus": cpus, "memory": memory, "gpus": gpus},
    )


KERNELSPECS = {
    s.name: s
    for s in [
        _spec("small", "cpu", cpus=0.5, memory=GIB),
        _spec("large", "cpu", cpus=2, memory=4 * GIB),
        _spec("gpu-1", "gpu", cpus=1, memory=8 * GIB, gpus=1),
        _spec("gpu-2", "gpu", cpus=1, memory=8 * GIB, gpus=2),
    ]
}


async def _try(scheduler: Scheduler, n: int, user: str, spec: str, wait_s: float) -> str:
    try:
        decision = await scheduler.admit(
            kernel_id=f"k{n}", user=user, groups=["ml"], kernelspec=spec, wait_s=wait_s
        )
    except (QuotaExceeded, PoolFull) as e:
        return e.code
    return "queued" if isinstance(decision, Queued) else "admitted"


async def check_consistent(scheduler: Scheduler) -> tuple[list, int]:
    """Counters, GPU sets, quotas and queues agree with what exists; (leases, waiting)."""
    redis = scheduler.redis
    leases = await scheduler.leases.list()
    assert await redis.zcard(keys.LEASES) == len(leases)
    for name, pool in scheduler.pools.items():
        mine = [x for x in leases if x.pool == name]
        used = await redis.hgetall(keys.pool_usage(name))
        assert int(used.get("kernels", 0)) == len(mine)
        assert int(used.get("cpus_milli", 0)) == sum(to_milli(x.cpus) for x in mine)
        assert int(used.get("cpus_milli", 0)) <= pool.cpus_milli
        assert int(used.get("memory", 0)) == sum(x.memory for x in mine) <= pool.memory
        devices = [d for x in mine for d in x.gpu_devices]
        assert len(devices) == len(set(devices)) == int(used.get("gpus", 0)) <= pool.gpus
        free = {int(d) for d in await redis.smembers(keys.pool_gpus_free(name))}
        assert free.isdisjoint(devices) and free | set(devices) == set(range(pool.gpus))
        by_state = Counter(x.state for x in mine)
        assert {s: int(used.get(s, 0)) for s in LIVE_STATES} == {
            s: by_state[s] for s in LIVE_STATES
        }
    waiting = {
        pool: [e.kernel_id for e in await scheduler.queue.waiting(pool)] for pool in scheduler.pools
    }
    queued_users = Counter()
    for pool, kernel_ids in waiting.items():
        assert not set(kernel_ids) & {x.kernel_id for x in leases}
        for kernel_id in kernel_ids:
            entry = await scheduler.queue.entry(kernel_id)
            assert entry is not None and entry.state == "waiting" and entry.pool == pool
            queued_users[entry.user] += 1
            assert await redis.sismember(keys.user_queued(entry.user), kernel_id)
            assert await redis.zscore(keys.QUEUE_DEADLINES, kernel_id) is not None
    total_waiting = sum(len(k) for k in waiting.values())
    assert await redis.zcard(keys.QUEUE_DEADLINES) == total_waiting
    for user in {x.user for x in leases} | set(queued_users):
        mine = [x for x in leases if x.user == user]
        usage = await redis.hgetall(keys.user_usage(user))
        assert int(usage.get("kernels", 0)) == len(mine)
        assert len(mine) + queued_users[user] <= KERNEL_QUOTA
        assert sum(x.gpus for x in mine) == int(usage.get("gpus", 0)) <= GPU_QUOTA
        assert sum(to_milli(x.cpus) for x in mine) <= 4000
        assert await redis.scard(keys.user_queued(user)) == queued_users[user]
    return leases, total_waiting


async def test_500_concurrent_admissions_never_overcommit(make_scheduler: MakeScheduler) -> None:
    replicas = [make_scheduler(PLATFORM, KERNELSPECS) for _ in range(4)]
    rng = random.Random(3)
    specs = list(KERNELSPECS)
    requests = [
        (n, f"u{n % 120}", rng.choice(specs), rng.choice([0.0, 0.0, 60.0])) for n in range(500)
    ]
    results = await asyncio.gather(
        *(_try(replicas[n % 4], n, user, spec, wait) for n, user, spec, wait in requests)
    )
    outcomes = Counter(results)
    assert set(outcomes) <= {"admitted", "queued", "quota_exceeded", "pool_full"}
    assert outcomes["admitted"] and outcomes["queued"] and outcomes["quota_exceeded"]
    leases, waiting = await check_consistent(replicas[0])
    assert len(leases) == outcomes["admitted"] and waiting == outcomes["queued"]
    assert Counter(x.pool for x in leases)["gpu"] >= 2  # the GPU pool was filled

    # Now release everything at once from all replicas: queued heads get in as room frees.
    ids = [x.kernel_id for x in leases]
    released = await asyncio.gather(*(replicas[i % 4].release(k) for i, k in enumerate(ids + ids)))
    assert sum(released) == len(ids)
    leases, left_waiting = await check_consistent(replicas[0])
    promoted = {x.kernel_id for x in leases}
    assert promoted and all(x.waited >= 0 for x in leases)
    assert len(promoted) + left_waiting <= waiting
    decisions = await asyncio.gather(*(replicas[0].admission(k) for k in sorted(promoted)))
    assert all(isinstance(d, Admission) for d in decisions)
