"""What the scheduler's in-process tests (a Scheduler on a real Redis) share: a small
platform and its kernelspecs, a clock the tests move by hand, admission helpers, and an
Enterprise Gateway stand-in for reconciliation."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from kernelfleet.config import PlatformConfig
from kernelfleet.kernelspecs.spec import KernelSpec
from scheduler.admission import Admission, Queued
from scheduler.errors import GatewayUnavailable
from scheduler.service import Scheduler

GIB = 2**30

MakeScheduler = Callable[..., Scheduler]

PLATFORM = PlatformConfig.model_validate(
    {
        "pools": {
            "cpu": {"cpus": 8, "memory": "32Gi"},
            "gpu": {"cpus": 16, "memory": "64Gi", "gpus": 2, "simulated_gpus": True},
        },
        "quotas": {"default": {"kernels": 3}, "groups": {"ml": {"gpus": 1}, "team": {"gpus": 4}}},
        "kernel_launch_timeout": 60,
    }
)


def spec(name: str, pool: str, *, gpus: int = 0, groups: list[str] | None = None) -> KernelSpec:
    return KernelSpec(
        name=name,
        display_name=name,
        pool=pool,
        groups=groups or ["*"],
        resources={"cpus": 1, "memory": 2 * GIB, "gpus": gpus},
    )


KERNELSPECS = {
    s.name: s
    for s in [
        spec("python-cpu", "cpu"),
        spec("python-gpu", "gpu", gpus=1, groups=["ml", "team"]),
        spec("python-gpu-2", "gpu", gpus=2, groups=["ml", "team"]),
    ]
}


class ManualClock:
    """Unix time that moves only when a test says so."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def admit(
    scheduler: Scheduler,
    user: str,
    kernelspec: str = "python-gpu",
    *,
    groups=("ml",),
    wait_s: float = 60.0,
    kernel_id: str | None = None,
) -> Admission | Queued:
    return await scheduler.admit(
        kernel_id=kernel_id or f"{user}-{uuid.uuid4().hex[:8]}",
        user=user,
        groups=list(groups),
        kernelspec=kernelspec,
        wait_s=wait_s,
    )


async def fill_gpus(scheduler: Scheduler) -> list[str]:
    """Two 1-GPU kernels of two users: the gpu pool is full."""
    held = [await admit(scheduler, f"holder{n}", wait_s=0) for n in range(2)]
    assert all(isinstance(h, Admission) for h in held)
    return [h.lease.kernel_id for h in held]  # type: ignore[union-attr]


class FakeGateway:
    """EG's kernels as a set; records shutdowns; can be down."""

    def __init__(self, kernels: set[str] | None = None) -> None:
        self.kernels = set(kernels or ())
        self.stopped: list[str] = []
        self.down = False

    async def kernel_ids(self) -> set[str]:
        if self.down:
            raise GatewayUnavailable("EG is down")
        return set(self.kernels)

    async def shutdown(self, kernel_id: str) -> None:
        if self.down:
            raise GatewayUnavailable("EG is down")
        self.stopped.append(kernel_id)
        self.kernels.discard(kernel_id)
