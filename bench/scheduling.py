"""The scheduler as the admission and scale phases use it: a platform, a real Redis, checks.

The bench platform has a ``cpu`` pool and a simulated-GPU ``gpu`` pool of fixed size (not
measured from this host, so results compare across machines), the repository's curated
kernelspecs, and ``users`` simulated users of whom every other one is in group ``ml``
(allowed python-gpu, 1 GPU each). :func:`over_commits` re-reads every live lease and
lists each limit that Redis shows exceeded: a pool's capacity, a user's quota, a GPU
device held twice, or usage counters that disagree with the leases.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from kernelfleet.config import PlatformConfig
from kernelfleet.kernelspecs.spec import KernelSpec, load_kernelspecs
from scheduler.leases import Lease
from scheduler.pools import resolve_pools, to_milli
from scheduler.quotas import effective_quota
from scheduler.service import Scheduler
from scheduler.store import connect, describe

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


def user_name(i: int) -> str:
    """The ``i``-th simulated user (0-based): s0000, s0001, ..."""
    return f"s{i:04d}"


def user_groups(i: int) -> list[str]:
    """Every other simulated user is in ``ml`` (may start python-gpu)."""
    return ["analysts", "ml"] if i % 2 else ["analysts"]


def bench_platform(
    *, users: int, cpus: float, gpus: int, kernels: int | None = 3
) -> PlatformConfig:
    """A platform with fixed pools (``cpus`` CPUs and 8 GiB per CPU; ``gpus`` simulated GPUs)
    and ``users`` simulated users (quota: ``kernels`` concurrent kernels, 1 GPU for ml)."""
    memory = int(cpus * 8 * GIB)
    return PlatformConfig.model_validate({
        "pools": {
            "cpu": {"cpus": cpus, "memory": memory, "overcommit": 1},
            "gpu": {"cpus": cpus, "memory": memory, "gpus": gpus, "simulated_gpus": True,
                    "overcommit": 1},
        },
        "quotas": {"default": {"kernels": kernels}, "groups": {"ml": {"gpus": 1}}},
        "users": {user_name(i): {"groups": user_groups(i)} for i in range(users)},
        "kernelspecs_dir": str(REPO / "kernelspecs"),
    })  # fmt: skip


def bench_kernelspecs(platform: PlatformConfig) -> dict[str, KernelSpec]:
    """The repository's curated kernelspecs (python-cpu, python-cpu-large, python-gpu)."""
    return load_kernelspecs(REPO / "kernelspecs", platform)


@asynccontextmanager
async def scheduler_on(
    redis_url: str,
    platform: PlatformConfig,
    *,
    clock: Callable[[], float] | None = None,
    max_connections: int | None = None,
) -> AsyncIterator[Scheduler]:
    """An in-process Scheduler on ``redis_url`` (its client closed on exit)."""
    redis = connect(redis_url, **({"max_connections": max_connections}
                                  if max_connections else {}))  # fmt: skip
    extra: dict[str, Any] = {"clock": clock} if clock is not None else {}
    try:
        yield Scheduler.from_config(
            redis, platform, pools=resolve_pools(platform),
            kernelspecs=bench_kernelspecs(platform), location=describe(redis_url), **extra,
        )  # fmt: skip
    finally:
        await redis.aclose()


def _pool_problems(scheduler: Scheduler, leases: list[Lease]) -> list[str]:
    problems = []
    by_pool: dict[str, list[Lease]] = defaultdict(list)
    for lease in leases:
        by_pool[lease.pool].append(lease)
    for name, pool in scheduler.pools.items():
        held = by_pool.get(name, [])
        cpus_milli = sum(to_milli(lease.cpus) for lease in held)
        memory = sum(lease.memory for lease in held)
        devices = [d for lease in held for d in lease.gpu_devices]
        if cpus_milli > pool.cpus_milli:
            problems.append(f"pool {name}: {cpus_milli / 1000} CPUs leased of {pool.cpus}")
        if memory > pool.memory:
            problems.append(f"pool {name}: {memory} bytes leased of {pool.memory}")
        if len(devices) != len(set(devices)) or any(d >= pool.gpus for d in devices):
            problems.append(f"pool {name}: GPU devices {sorted(devices)} of {pool.gpus}")
        if sum(lease.gpus for lease in held) > pool.gpus:
            problems.append(f"pool {name}: more GPUs leased than its {pool.gpus}")
    return problems


def _user_problems(platform: PlatformConfig, leases: list[Lease]) -> list[str]:
    problems = []
    by_user: dict[str, list[Lease]] = defaultdict(list)
    for lease in leases:
        by_user[lease.user].append(lease)
    for user, held in by_user.items():
        groups = platform.users[user].groups if user in platform.users else []
        quota = effective_quota(platform.quotas, user, groups)
        if quota.kernels is not None and len(held) > quota.kernels:
            problems.append(f"user {user}: {len(held)} kernels of {quota.kernels}")
        gpus = sum(lease.gpus for lease in held)
        if quota.gpus is not None and gpus > quota.gpus:
            problems.append(f"user {user}: {gpus} GPUs of {quota.gpus}")
    return problems


async def over_commits(scheduler: Scheduler, platform: PlatformConfig) -> list[str]:
    """Every limit the live leases in Redis exceed now, and counters that disagree."""
    leases = await scheduler.leases.list()
    problems = _pool_problems(scheduler, leases) + _user_problems(platform, leases)
    for status in await scheduler.pool_status():
        held = [lease for lease in leases if lease.pool == status.pool.name]
        if status.kernels != len(held):
            problems.append(f"pool {status.pool.name}: counter says {status.kernels} kernels, "
                            f"{len(held)} leases exist")  # fmt: skip
    return problems
