"""Pool capacity: what each pool of kernelfleet.yaml can hold, resolved once at start.

Rules (embedded backend):

- ``cpus: host`` is ``os.cpu_count()``; ``memory: host`` is the physical memory of this
  machine. Both, and explicit numbers too, are multiplied by the pool's ``overcommit``
  (kernelfleet.yaml documents overcommit as multiplying cpus and memory, not GPUs).
- ``gpus: host`` counts the ``GPU n: ...`` lines of ``nvidia-smi -L``; no nvidia-smi, or
  one that fails, means 0 GPUs. A number of GPUs is taken as configured (with
  ``simulated_gpus: true`` those are pretend devices for demos and tests).
- GPU devices are the indexes ``0 .. gpus-1``; kernels get them as CUDA_VISIBLE_DEVICES.

CPU capacity is kept in thousandths of a CPU ("milli-CPUs") so that Redis counters stay
integers and 0.1 + 0.2 never drifts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kernelfleet.config import PlatformConfig, PoolConfig

MILLI = 1000
_NVIDIA_SMI_TIMEOUT_S = 10


def to_milli(cpus: float) -> int:
    """CPUs as integer thousandths (1.5 -> 1500)."""
    return round(cpus * MILLI)


def from_milli(milli: int) -> float | int:
    """Thousandths of a CPU back to a number, as an int when whole (1500 -> 1.5, 2000 -> 2)."""
    value = milli / MILLI
    return int(value) if value == int(value) else value


@dataclass(frozen=True)
class HostProbe:
    """How to measure this machine; tests pass fixed values instead."""

    cpu_count: Callable[[], int]
    memory_bytes: Callable[[], int]
    gpu_count: Callable[[], int]


def host_cpu_count() -> int:
    """Logical CPUs of this machine (at least 1)."""
    return os.cpu_count() or 1


def host_memory_bytes() -> int:
    """Physical memory of this machine in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def count_nvidia_gpus(*, nvidia_smi: str | None = None) -> int:
    """GPUs listed by ``nvidia-smi -L``; 0 when it is missing or fails."""
    binary = nvidia_smi or shutil.which("nvidia-smi")
    if not binary:
        return 0
    try:
        result = subprocess.run(
            [binary, "-L"], capture_output=True, text=True, timeout=_NVIDIA_SMI_TIMEOUT_S
        )
    except (OSError, subprocess.SubprocessError):
        return 0
    if result.returncode != 0:
        return 0
    return parse_nvidia_smi_list(result.stdout)


def parse_nvidia_smi_list(output: str) -> int:
    """Count the ``GPU 0: NVIDIA H100 ... (UUID: ...)`` lines of ``nvidia-smi -L``."""
    return sum(1 for line in output.splitlines() if line.startswith("GPU "))


HOST = HostProbe(
    cpu_count=host_cpu_count, memory_bytes=host_memory_bytes, gpu_count=count_nvidia_gpus
)


@dataclass(frozen=True)
class Pool:
    """One pool's resolved capacity and price."""

    name: str
    cpus_milli: int
    memory: int
    gpus: int
    simulated_gpus: bool
    cost_per_hour: float
    overcommit: float

    @property
    def cpus(self) -> float | int:
        """Capacity in CPUs (overcommit applied)."""
        return from_milli(self.cpus_milli)

    def capacity(self) -> dict[str, float | int]:
        """Capacity as the API reports it: cpus, memory (bytes), gpus."""
        return {"cpus": self.cpus, "memory": self.memory, "gpus": self.gpus}


def resolve_pool(name: str, config: PoolConfig, *, probe: HostProbe = HOST) -> Pool:
    """Turn one pool's settings into numbers (see the module docstring for the rules)."""
    cpus = probe.cpu_count() if config.cpus == "host" else config.cpus
    memory = probe.memory_bytes() if config.memory == "host" else config.memory
    gpus = probe.gpu_count() if config.gpus == "host" else config.gpus
    return Pool(
        name=name,
        cpus_milli=to_milli(cpus * config.overcommit),
        memory=int(memory * config.overcommit),
        gpus=int(gpus),
        simulated_gpus=config.simulated_gpus,
        cost_per_hour=config.cost_per_hour,
        overcommit=config.overcommit,
    )


def resolve_pools(platform: PlatformConfig, *, probe: HostProbe = HOST) -> Mapping[str, Pool]:
    """Every pool of kernelfleet.yaml, resolved; nvidia-smi runs at most once."""
    gpu_count: list[int] = []

    def cached_gpus() -> int:
        if not gpu_count:
            gpu_count.append(probe.gpu_count())
        return gpu_count[0]

    cached = HostProbe(
        cpu_count=probe.cpu_count, memory_bytes=probe.memory_bytes, gpu_count=cached_gpus
    )
    return {name: resolve_pool(name, pool, probe=cached) for name, pool in platform.pools.items()}
