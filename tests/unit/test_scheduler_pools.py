"""Pool capacity resolution: host measurement, overcommit, GPUs from nvidia-smi."""

from __future__ import annotations

import os
from pathlib import Path

from kernelfleet.config import PlatformConfig, PoolConfig
from scheduler.pools import (
    HostProbe,
    count_nvidia_gpus,
    from_milli,
    parse_nvidia_smi_list,
    resolve_pool,
    resolve_pools,
    to_milli,
)

GIB = 2**30
PROBE = HostProbe(cpu_count=lambda: 4, memory_bytes=lambda: 16 * GIB, gpu_count=lambda: 3)
SMI_OUTPUT = (
    "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)\n"
    "  MIG 1g.10gb Device 0: (UUID: MIG-bbbb)\n"
    "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-cccc)\n"
)


def test_host_capacity_is_multiplied_by_overcommit() -> None:
    pool = resolve_pool("cpu", PoolConfig(cpus="host", memory="host", overcommit=8), probe=PROBE)
    assert (pool.cpus, pool.memory, pool.gpus) == (32, 128 * GIB, 0)


def test_numbers_are_multiplied_too_but_never_gpus() -> None:
    config = PoolConfig(cpus=1.5, memory="2Gi", gpus=2, overcommit=2, simulated_gpus=True)
    pool = resolve_pool("gpu", config, probe=PROBE)
    assert (pool.cpus, pool.cpus_milli, pool.memory, pool.gpus) == (3, 3000, 4 * GIB, 2)
    assert pool.simulated_gpus and pool.capacity() == {"cpus": 3, "memory": 4 * GIB, "gpus": 2}


def test_gpus_host_asks_the_probe_once_for_all_pools() -> None:
    calls = []

    def gpus() -> int:
        calls.append(1)
        return 3

    probe = HostProbe(cpu_count=lambda: 1, memory_bytes=lambda: GIB, gpu_count=gpus)
    platform = PlatformConfig.model_validate(
        {"pools": {"a": {"gpus": "host"}, "b": {"gpus": "host"}, "c": {"gpus": 1}}}
    )
    pools = resolve_pools(platform, probe=probe)
    assert [p.gpus for p in pools.values()] == [3, 3, 1] and len(calls) == 1


def test_nvidia_smi_list_counts_gpu_lines_only() -> None:
    assert parse_nvidia_smi_list(SMI_OUTPUT) == 2
    assert parse_nvidia_smi_list("") == 0


def _fake_smi(tmp_path: Path, script: str) -> str:
    path = tmp_path / "nvidia-smi"
    path.write_text("#!/bin/sh\n" + script)
    os.chmod(path, 0o755)
    return str(path)


def test_count_nvidia_gpus_runs_nvidia_smi(tmp_path: Path) -> None:
    smi = _fake_smi(tmp_path, f"cat <<'EOF'\n{SMI_OUTPUT}EOF\n")
    assert count_nvidia_gpus(nvidia_smi=smi) == 2


def test_no_or_failing_nvidia_smi_means_no_gpus(tmp_path: Path) -> None:
    assert count_nvidia_gpus(nvidia_smi=str(tmp_path / "missing")) == 0
    failing = _fake_smi(tmp_path, "echo 'GPU 0: broken'; exit 9\n")
    assert count_nvidia_gpus(nvidia_smi=failing) == 0


def test_milli_cpus_round_trip_without_float_drift() -> None:
    assert to_milli(0.1) + to_milli(0.2) == to_milli(0.3)
    assert from_milli(1500) == 1.5 and from_milli(2000) == 2 and isinstance(from_milli(2000), int)
