"""What users read when the scheduler refuses (asserted verbatim)."""

from __future__ import annotations

from scheduler import keys, messages


def test_kernel_quota() -> None:
    assert messages.kernels_quota(used=3, limit=3) == (
        "You already have 3 of 3 kernels running. Shut one down from the Running panel."
    )
    assert messages.kernels_quota(used=0, limit=0).startswith("Your quota allows no kernels.")


def test_gpu_quota() -> None:
    text = messages.gpus_quota(used=1, limit=1, need=1, kernelspec="python-gpu")
    assert text == "GPU quota: 1 of 1 GPUs in use by you. Shut down a GPU kernel first."
    assert messages.gpus_quota(used=1, limit=2, need=2, kernelspec="python-gpu-2") == (
        "GPU quota: 1 of 2 GPUs in use by you and python-gpu-2 needs 2. "
        "Shut down a GPU kernel first."
    )


def test_pool_gpus_full() -> None:
    full = messages.pool_gpus_full(
        pool="gpu", total=2, free=0, need=1, kernelspec="python-gpu", alternative="python-cpu"
    )
    assert full == "All 2 GPUs in pool gpu are in use. Try again later, or pick python-cpu."
    alone = messages.pool_gpus_full(
        pool="gpu", total=2, free=0, need=1, kernelspec="python-gpu", alternative=None
    )
    assert alone == "All 2 GPUs in pool gpu are in use. Try again later."
    too_big = messages.pool_gpus_full(
        pool="gpu", total=0, free=0, need=1, kernelspec="python-gpu", alternative="python-cpu"
    )
    assert too_big.startswith("python-gpu needs 1 GPUs but pool gpu has 0. Pick python-cpu")


def test_cpu_and_memory_texts() -> None:
    assert messages.pool_cpus_full(
        pool="cpu", used=15.5, capacity=16, need=1, kernelspec="python-cpu"
    ).startswith("Pool cpu is full: 15.5 of 16 CPUs in use and python-cpu needs 1. Try again")
    text = messages.memory_quota(used=6 * 2**30, limit=8 * 2**30, need=3 * 2**29, kernelspec="big")
    assert text == (
        "Memory quota: 6 GiB of 8 GiB in use by you and big needs 1.5 GiB. "
        "Shut down a kernel first."
    )


def test_number_and_memory_formatting() -> None:
    assert [messages.number(x) for x in (2.0, 1.5, 0.125, 3)] == ["2", "1.5", "0.125", "3"]
    assert messages.memory(512 * 2**20) == "512 MiB"
    assert messages.memory(100) == "100 bytes"


def test_user_names_cannot_break_out_of_their_key() -> None:
    assert keys.user_usage("a:b") == "kf:user:a%3Ab:usage"
    assert keys.user_leases("a") != keys.user_leases("a:leases")
    assert keys.user_usage("ann@example.org") == "kf:user:ann%40example.org:usage"
    assert keys.user_usage("ann_b.c-d~e") == "kf:user:ann_b.c-d~e:usage"  # unchanged
    assert keys.lease("Ünïcode/..") == "kf:lease:%C3%9Cn%C3%AFcode%2F.."
