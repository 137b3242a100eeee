"""The Redis layout the scheduler writes (scheduler.keys), and data of an older layout.

An upgraded scheduler finds what the previous one wrote: lease counts per state, GPU device
counts and user profiles in hashes of their own (layout 1). It merges them once at start-up
and then decides exactly as if it had written them itself. Stopped leases are kept for
``STOPPED_KEEP_S`` and trimmed by a background step, not by Redis expiry.
"""

from __future__ import annotations

import json

from scheduler import keys
from scheduler.activity import Report
from scheduler.admission import Admission, Queued
from scheduler.leases import STOPPED_KEEP_S
from scheduler.loops import Loops
from scheduler.migrate import migrate
from tests.support.scheduler_setup import (
    KERNELSPECS,
    PLATFORM,
    MakeScheduler,
    ManualClock,
    admit,
)


async def test_a_layout_1_redis_is_merged_once_and_decisions_go_on(
    make_scheduler: MakeScheduler,
) -> None:
    clock = ManualClock()
    scheduler = make_scheduler(PLATFORM, KERNELSPECS, clock=clock)
    redis = scheduler.redis
    held = await admit(scheduler, "ann", "python-gpu")
    assert isinstance(held, Admission)
    # what a layout-1 scheduler left: its three hashes, and none of their fields in usage
    usage = keys.pool_usage("gpu")
    await redis.hdel(usage, "starting", "gpu_devices")
    await redis.hdel(keys.user_usage("ann"), "groups", "admin")
    await redis.hset("kf:pool:gpu:states", mapping={"starting": 1, "idle": 2})
    await redis.hset("kf:pool:gpu:meta", "gpu_devices", 2)
    await redis.hset("kf:user:ann:profile", mapping={"groups": '["ml"]', "admin": "0"})
    await redis.hset("kf:pool:gpu:queue:meta", mapping={"vtime": 3, "seq": 7})  # not layout 1
    await redis.delete(keys.SCHEMA_KEY)

    assert await migrate(redis) == 3
    assert await redis.hgetall(usage) == {
        "kernels": "1", "cpus_milli": "1000", "memory": str(2 * 2**30), "gpus": "1",
        "starting": "1", "idle": "2", "gpu_devices": "2",
    }  # fmt: skip
    assert (await redis.hgetall(keys.user_usage("ann")))["groups"] == '["ml"]'
    for old in ("kf:pool:gpu:states", "kf:pool:gpu:meta", "kf:user:ann:profile"):
        assert not await redis.exists(old)
    assert await redis.hgetall("kf:pool:gpu:queue:meta") == {"vtime": "3", "seq": "7"}
    assert await redis.get(keys.SCHEMA_KEY) == str(keys.SCHEMA)
    assert await migrate(redis) == 0  # done once: nothing counted twice

    # the device the old layout held stays held; the other one is free
    second = await admit(scheduler, "bob", "python-gpu")
    assert isinstance(second, Admission) and second.lease.gpu_devices == [1]
    assert await scheduler.release(held.lease.kernel_id)
    pools = {status.pool.name: status for status in await scheduler.pool_status()}
    # bob's lease, and the two idle ones the old layout counted
    assert pools["gpu"].states == {"starting": 1, "idle": 2}


async def test_a_request_queued_by_layout_1_is_admitted_from_the_queue(
    make_scheduler: MakeScheduler,
) -> None:
    scheduler = make_scheduler(PLATFORM, KERNELSPECS, clock=ManualClock())
    first = await admit(scheduler, "ann", "python-gpu-2", groups=["team"])
    waiting = await admit(scheduler, "bob", "python-gpu", groups=["team"])
    assert isinstance(first, Admission) and isinstance(waiting, Queued)
    # layout 1 kept the request's arguments with quota and capacity as objects
    entry = keys.queued(waiting.kernel_id)
    stored = json.loads(await scheduler.redis.hget(entry, "args"))
    nested = {k: v for k, v in stored.items() if not k.startswith(("quota_", "capacity_"))}
    for part in ("quota", "capacity"):
        nested[part] = {k.split("_", 1)[1]: v for k, v in stored.items() if k.startswith(part)}
    await scheduler.redis.hset(entry, "args", json.dumps(nested))

    assert await scheduler.release(first.lease.kernel_id)
    admitted = await scheduler.admission(waiting.kernel_id)
    assert isinstance(admitted, Admission) and admitted.lease.gpus == 1


async def test_stopped_leases_are_listed_for_an_hour_then_trimmed(
    make_scheduler: MakeScheduler,
) -> None:
    clock = ManualClock()
    scheduler = make_scheduler(PLATFORM, KERNELSPECS, clock=clock)
    old = await admit(scheduler, "ann", "python-cpu")
    await scheduler.release(old.lease.kernel_id)
    clock.advance(STOPPED_KEEP_S - 10)
    recent = await admit(scheduler, "ann", "python-cpu")
    await scheduler.release(recent.lease.kernel_id)
    stopped = [lease.kernel_id for lease in await scheduler.leases.list(state="stopped")]
    assert stopped == [old.lease.kernel_id, recent.lease.kernel_id]

    clock.advance(20)  # the first is past its hour: no longer listed, even before the trim
    assert [x.kernel_id for x in await scheduler.leases.list(state="stopped")] == [
        recent.lease.kernel_id
    ]
    assert await scheduler.redis.exists(keys.stopped(old.lease.kernel_id))
    loops = Loops(scheduler)
    assert await loops.run_step("stopped")
    assert not await scheduler.redis.exists(keys.stopped(old.lease.kernel_id))
    assert await scheduler.redis.zrange(keys.STOPPED, 0, -1) == [recent.lease.kernel_id]
    assert await scheduler.leases.trim_stopped() == 0


async def test_a_lease_holds_its_defaults_unwritten_and_reads_back_whole(
    make_scheduler: MakeScheduler,
) -> None:
    clock = ManualClock()
    scheduler = make_scheduler(PLATFORM, KERNELSPECS, clock=clock)
    admitted = await admit(scheduler, "ann", "python-cpu")
    fields = await scheduler.redis.hgetall(keys.lease(admitted.lease.kernel_id))
    assert not {"gpu_devices", "waited", "connections", "last_activity"} & set(fields)
    assert await scheduler.leases.get(admitted.lease.kernel_id) == admitted.lease
    # an activity report from before the lease began does not move its last activity back
    kid = admitted.lease.kernel_id
    await scheduler.report_activity([Report(kernel_id=kid, execution_state="idle",
                                            last_activity=clock.now - 60)])  # fmt: skip
    lease = await scheduler.leases.get(kid)
    assert lease is not None and lease.state == "idle" and lease.last_activity == clock.now
