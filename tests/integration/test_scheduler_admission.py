"""Admission and release against a real Redis: quotas, capacity, GPU devices, races."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable

import pytest

from kernelfleet.config import PlatformConfig
from kernelfleet.kernelspecs.spec import KernelSpec
from scheduler import keys
from scheduler.errors import LeaseConflict, PoolFull, QuotaExceeded, SchedulerError
from scheduler.pools import to_milli
from scheduler.service import Scheduler

GIB = 2**30
MakeScheduler = Callable[..., Scheduler]

PLATFORM = PlatformConfig.model_validate(
    {
        "pools": {
            "cpu": {"cpus": 40, "memory": "400Gi", "cost_per_hour": 0.1},
            "gpu": {"cpus": 100, "memory": "400Gi", "gpus": 4, "simulated_gpus": True},
        },
        "quotas": {
            "default": {"kernels": 3},
            "groups": {"ml": {"gpus": 2}, "capped": {"cpus": 2.5}, "lowmem": {"memory": "5Gi"}},
        },
    }
)


def _spec(name: str, pool: str, *, cpus: float, memory: int, gpus: int = 0, groups=None):
    return KernelSpec(
        name=name, display_name=name, pool=pool, groups=groups or ["*"],
        resources={"cpus": cpus, "memory": memory, "gpus": gpus},
    )  # fmt: skip


KERNELSPECS = {
    spec.name: spec
    for spec in [
        _spec("python-cpu", "cpu", cpus=1, memory=2 * GIB),
        _spec("python-cpu-large", "cpu", cpus=2, memory=4 * GIB),
        _spec("python-gpu", "gpu", cpus=1, memory=4 * GIB, gpus=1, groups=["ml"]),
        _spec("python-gpu-2", "gpu", cpus=1, memory=4 * GIB, gpus=2, groups=["ml"]),
    ]
}


class FakeClock:
    """A clock that only moves when told."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def scheduler(make_scheduler: MakeScheduler) -> Scheduler:
    return make_scheduler(PLATFORM, KERNELSPECS, clock=FakeClock())


async def _admit(scheduler: Scheduler, user: str, spec: str, *, groups=(), kernel_id=None):
    return await scheduler.admitter.admit(
        kernel_id=kernel_id or str(uuid.uuid4()), user=user, groups=list(groups), kernelspec=spec
    )


async def test_admits_until_kernel_quota_then_refuses_with_exact_message(scheduler):
    admitted = [await _admit(scheduler, "alice", "python-cpu") for _ in range(3)]
    with pytest.raises(QuotaExceeded) as refused:
        await _admit(scheduler, "alice", "python-cpu")
    assert refused.value.message == (
        "You already have 3 of 3 kernels running. Shut one down from the Running panel."
    )
    assert refused.value.status == 403 and refused.value.code == "quota_exceeded"
    assert await scheduler.release(admitted[0].lease.kernel_id) is True
    assert await scheduler.release(admitted[0].lease.kernel_id) is False
    await _admit(scheduler, "alice", "python-cpu")  # the freed slot is usable again
    await _admit(scheduler, "bob", "python-cpu")  # quotas are per user


async def test_lease_has_contract_fields_and_cpu_env_hides_gpus(scheduler):
    admission = await _admit(scheduler, "alice", "python-cpu", kernel_id="k-1")
    lease = admission.lease
    assert admission.created
    assert (lease.kernel_id, lease.user, lease.kernelspec, lease.pool) == (
        "k-1", "alice", "python-cpu", "cpu",
    )  # fmt: skip
    assert (lease.cpus, lease.memory, lease.gpus, lease.gpu_devices) == (1.0, 2 * GIB, 0, [])
    assert lease.state == "starting" and lease.created == lease.last_activity == 1_700_000_001.0
    assert admission.env == {"CUDA_VISIBLE_DEVICES": ""}
    assert await scheduler.leases.get("k-1") == lease


async def test_gpu_devices_are_distinct_and_freed(scheduler):
    first = await _admit(scheduler, "carol", "python-gpu", groups=["ml"])
    second = await _admit(scheduler, "dave", "python-gpu-2", groups=["ml"])
    third = await _admit(scheduler, "erin", "python-gpu", groups=["ml"])
    devices = first.lease.gpu_devices + second.lease.gpu_devices + third.lease.gpu_devices
    assert sorted(devices) == [0, 1, 2, 3]
    assert second.env == {"CUDA_VISIBLE_DEVICES": ",".join(map(str, second.lease.gpu_devices))}
    with pytest.raises(PoolFull) as full:
        await _admit(scheduler, "frank", "python-gpu", groups=["ml"])
    assert full.value.message == (
        "All 4 GPUs in pool gpu are in use. Try again later, or pick python-cpu."
    )
    await scheduler.release(second.lease.kernel_id)
    again = await _admit(scheduler, "frank", "python-gpu-2", groups=["ml"])
    assert sorted(again.lease.gpu_devices) == sorted(second.lease.gpu_devices)


async def test_gpu_quota_refuses_with_exact_message(scheduler):
    await _admit(scheduler, "carol", "python-gpu", groups=["ml"])
    await _admit(scheduler, "carol", "python-gpu", groups=["ml"])
    with pytest.raises(QuotaExceeded) as refused:
        await _admit(scheduler, "carol", "python-gpu", groups=["ml"])
    assert refused.value.message == (
        "GPU quota: 2 of 2 GPUs in use by you. Shut down a GPU kernel first."
    )


async def test_cpu_and_memory_quota_and_pool_capacity(scheduler):
    await _admit(scheduler, "cap", "python-cpu-large", groups=["capped"])
    with pytest.raises(QuotaExceeded) as cpu:
        await _admit(scheduler, "cap", "python-cpu", groups=["capped"])
    assert cpu.value.message == (
        "CPU quota: 2 of 2.5 CPUs in use by you and python-cpu needs 1. Shut down a kernel first."
    )
    await _admit(scheduler, "mem", "python-cpu-large", groups=["lowmem"])
    with pytest.raises(QuotaExceeded) as memory:
        await _admit(scheduler, "mem", "python-cpu", groups=["lowmem"])
    assert memory.value.message == (
        "Memory quota: 4 GiB of 5 GiB in use by you and python-cpu needs 2 GiB. "
        "Shut down a kernel first."
    )
    for user in range(18):
        await _admit(scheduler, f"user{user}", "python-cpu-large")
    with pytest.raises(PoolFull) as full:  # 2 + 2 + 18 * 2 = 40 CPUs used of 40
        await _admit(scheduler, "late", "python-cpu")
    assert full.value.message.startswith("Pool cpu is full: 40 of 40 CPUs in use and python-cpu")


async def test_admission_is_idempotent_per_kernel_id(scheduler):
    first = await _admit(scheduler, "carol", "python-gpu", groups=["ml"], kernel_id="same")
    again = await _admit(scheduler, "carol", "python-gpu", groups=["ml"], kernel_id="same")
    assert not again.created and again.lease == first.lease and again.env == first.env
    usage = await scheduler.redis.hgetall(keys.user_usage("carol"))
    assert usage == {"kernels": "1", "cpus_milli": "1000", "memory": str(4 * GIB), "gpus": "1",
                     "groups": '["ml"]', "admin": "0"}  # fmt: skip
    with pytest.raises(LeaseConflict):
        await _admit(scheduler, "mallory", "python-gpu", groups=["ml"], kernel_id="same")


async def test_gpu_free_set_is_rebuilt_after_redis_loses_its_data(scheduler):
    await _admit(scheduler, "carol", "python-gpu", groups=["ml"])
    await scheduler.redis.flushall()
    admitted = await _admit(scheduler, "carol", "python-gpu", groups=["ml"])
    assert admitted.lease.gpu_devices == [0]


async def _try(scheduler: Scheduler, user: str, spec: str) -> str | None:
    try:
        admission = await _admit(scheduler, user, spec, groups=["ml"])
    except (QuotaExceeded, PoolFull):
        return None
    return admission.lease.kernel_id


async def _check_consistent(scheduler: Scheduler) -> list:
    """Redis counters and GPU sets agree with the leases that exist; returns the leases."""
    leases = await scheduler.leases.list()
    redis = scheduler.redis
    assert await redis.zcard(keys.LEASES) == len(leases)
    for name, pool in scheduler.pools.items():
        mine = [lease for lease in leases if lease.pool == name]
        used = await redis.hgetall(keys.pool_usage(name))
        assert int(used.get("kernels", 0)) == len(mine)
        assert int(used.get("cpus_milli", 0)) == sum(to_milli(x.cpus) for x in mine)
        assert int(used.get("cpus_milli", 0)) <= pool.cpus_milli
        assert int(used.get("memory", 0)) == sum(x.memory for x in mine) <= pool.memory
        devices = [d for x in mine for d in x.gpu_devices]
        assert len(devices) == len(set(devices)) == int(used.get("gpus", 0)) <= pool.gpus
        free = {int(d) for d in await redis.smembers(keys.pool_gpus_free(name))}
        assert free.isdisjoint(devices) and free | set(devices) == set(range(pool.gpus))
    for user, count in Counter(lease.user for lease in leases).items():
        assert count <= 3
        usage = await redis.hgetall(keys.user_usage(user))
        assert int(usage["kernels"]) == count
    return leases


async def test_200_concurrent_admissions_never_overcommit(scheduler):
    requests = [
        (f"u{n}", spec) for n in range(50) for spec in ("python-cpu", "python-gpu") * 2
    ]  # 200 requests: 100 for 40 CPUs, 100 for 4 GPUs, 4 per user against a quota of 3
    results = await asyncio.gather(*(_try(scheduler, user, spec) for user, spec in requests))
    leases = await _check_consistent(scheduler)
    assert len(leases) == sum(1 for r in results if r is not None)
    by_pool = Counter(lease.pool for lease in leases)
    assert by_pool == {"cpu": 40, "gpu": 4}

    ids = [r for r in results if r is not None]
    released = await asyncio.gather(*(scheduler.release(i) for i in ids + ids))
    assert sum(released) == len(ids)
    assert await _check_consistent(scheduler) == []
    assert await scheduler.redis.hgetall(keys.pool_usage("cpu")) == {
        "kernels": "0", "cpus_milli": "0", "memory": "0", "gpus": "0", "starting": "0",
    }  # fmt: skip


async def test_refusals_are_scheduler_errors_with_http_status(scheduler):
    with pytest.raises(SchedulerError) as unknown:
        await _admit(scheduler, "alice", "nope")
    assert unknown.value.status == 404 and "nope" in unknown.value.message
    with pytest.raises(SchedulerError) as forbidden:
        await _admit(scheduler, "alice", "python-gpu", groups=["analysts"])
    assert forbidden.value.status == 403 and forbidden.value.code == "kernelspec_forbidden"
