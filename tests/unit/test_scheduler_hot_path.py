"""Shortcuts the admission hot path takes, checked against the slow way they replace."""

from __future__ import annotations

import pytest

from kernelfleet.config import Quota
from scheduler import keys, lua
from scheduler.admission import admission_args
from scheduler.leases import Lease
from scheduler.pools import Pool
from tests.support.scheduler_setup import KERNELSPECS

VALUES = dict(
    kernel_id="k" * 36, user="ann", kernelspec="python-gpu", pool="gpu", cpus=1.0, memory=2**31,
    gpus=1, gpu_devices=[0], state="starting", created=1.5, last_activity=1.5, connections=0,
    waited=0.0, stopped=None, stop_reason=None,
)  # fmt: skip


def test_lease_of_is_model_construct_with_every_field() -> None:
    fast, slow = Lease.of(**VALUES), Lease.model_construct(**VALUES)
    assert fast == slow and fast.model_dump_json() == slow.model_dump_json()
    assert fast.model_fields_set == slow.model_fields_set
    fast.state = "idle"  # an ordinary model: fields can be set
    assert fast.state == "idle" and slow.state == "starting"


def test_lease_of_refuses_a_missing_or_unknown_field() -> None:
    with pytest.raises(TypeError, match="waited"):
        Lease.of(**{k: v for k, v in VALUES.items() if k != "waited"})
    with pytest.raises(TypeError, match="color"):
        Lease.of(**VALUES, color="red")


@pytest.mark.parametrize("kernel_id", ["0c6f-4a1e", "a b/c:d", "é"])
def test_kernel_part_is_the_kernels_own_keys(kernel_id: str) -> None:
    assert keys.ScriptKeys.kernel_part(kernel_id) == (
        keys.lease(kernel_id),
        keys.queued(kernel_id),
        keys.stopped(kernel_id),
    )
    full = keys.ScriptKeys.for_kernel(kernel_id, user="u", pool="p").as_list()
    assert full[-3:] == list(keys.ScriptKeys.kernel_part(kernel_id))


def test_admission_args_follow_the_scripts_request_fields() -> None:
    spec = KERNELSPECS["python-gpu"]
    pool = Pool(
        name="gpu",
        cpus_milli=16000,
        memory=64 * 2**30,
        gpus=2,
        simulated_gpus=True,
        cost_per_hour=0.0,
        overcommit=1.0,
    )
    args = admission_args(user="ann", groups=["ml", "ml"], admin=True, spec=spec, pool=pool,
                          quota=Quota(kernels=3, gpus=1))  # fmt: skip
    named = dict(zip((name for name, _ in lua.REQUEST_FIELDS), args, strict=True))
    assert named == {
        "user": "ann", "kernelspec": "python-gpu", "pool": "gpu", "cpus": "1.0",
        "cpus_milli": 1000, "memory": 2 * 2**30, "gpus": 1, "groups": '["ml"]', "admin": 1,
        "warm": 0, "window": 86400, "quota_kernels": 3, "quota_cpus_milli": -1,
        "quota_memory": -1, "quota_gpus": 1, "quota_gpu_seconds": -1,
        "capacity_cpus_milli": 16000, "capacity_memory": 64 * 2**30, "capacity_gpus": 2,
    }  # fmt: skip
    # the script reads them from ARGV[REQUEST_OFFSET + 1] on, by the same names
    table = lua._request_table()
    assert f"user = v[{lua.REQUEST_OFFSET + 1}]" in table
    assert f"capacity_gpus = v[{lua.REQUEST_OFFSET + len(args)}] + 0" in table
