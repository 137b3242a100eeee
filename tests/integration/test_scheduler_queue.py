"""Fair queueing for full pools against a real Redis, with a clock the tests move (no sleeps).

FIFO across users, round-robin between them, the head admitted at once when room frees and
never skipped, time-outs that say where the user stood, clients that give up leaving.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from scheduler.admission import Admission, Queued
from scheduler.app import create_app
from scheduler.errors import PoolFull, QueueTimedOut, QuotaExceeded, UnknownAdmission
from scheduler.service import Scheduler
from tests.support.scheduler_setup import (
    KERNELSPECS,
    PLATFORM,
    MakeScheduler,
    ManualClock,
    admit,
    fill_gpus,
)

TOKEN = "queue-test-" + uuid.uuid4().hex
AUTH = {"Authorization": f"token {TOKEN}"}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def scheduler(make_scheduler: MakeScheduler, clock: ManualClock) -> Scheduler:
    return make_scheduler(PLATFORM, KERNELSPECS, clock=clock)


@pytest.fixture
async def client(scheduler: Scheduler) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(scheduler, token=TOKEN)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://s", headers=AUTH) as c:
        yield c


async def queue_order(scheduler: Scheduler, pool: str = "gpu") -> list[str]:
    return [entry.kernel_id for entry in await scheduler.queue.waiting(pool)]


async def test_fifo_across_users_round_robin_between_them(scheduler: Scheduler) -> None:
    held = await fill_gpus(scheduler)
    for kernel_id in ("a1", "a2", "a3"):
        assert isinstance(
            await admit(scheduler, "alice", groups=["team"], kernel_id=kernel_id), Queued
        )
    bob = await admit(scheduler, "bob", kernel_id="b1")
    carol = await admit(scheduler, "carol", kernel_id="c1")
    assert isinstance(bob, Queued) and bob.position == 2  # alice's 2nd and 3rd wait behind bob
    assert isinstance(carol, Queued) and carol.position == 3
    assert await queue_order(scheduler) == ["a1", "b1", "c1", "a2", "a3"]
    assert [e.position for e in await scheduler.queue.of_user("alice")] == [1, 4, 5]

    await scheduler.release(held[0])  # room: the head is admitted at once
    admitted = await scheduler.admission("a1")
    assert isinstance(admitted, Admission) and admitted.lease.state == "starting"
    assert admitted.env == {"CUDA_VISIBLE_DEVICES": "0"}
    await admit(scheduler, "dave", kernel_id="d1")  # a newcomer waits one round, not the end
    assert await queue_order(scheduler) == ["b1", "c1", "a2", "d1", "a3"]
    await scheduler.release(held[1])
    assert isinstance(await scheduler.admission("b1"), Admission)
    assert await queue_order(scheduler) == ["c1", "a2", "d1", "a3"]


async def test_the_head_is_never_skipped_for_a_smaller_request(scheduler: Scheduler) -> None:
    held = await fill_gpus(scheduler)
    big = await admit(scheduler, "alice", "python-gpu-2", groups=["team"], kernel_id="big")
    small = await admit(scheduler, "bob", kernel_id="small")
    assert isinstance(big, Queued) and isinstance(small, Queued) and small.position == 2
    await scheduler.release(held[0])  # one GPU free: big does not fit, small must not jump
    assert await queue_order(scheduler) == ["big", "small"]
    with pytest.raises(PoolFull) as refused:  # nor may a request that does not wait
        await admit(scheduler, "erin", wait_s=0)
    assert refused.value.message == (
        "2 requests are already waiting for pool gpu. Try again later, or pick python-cpu."
    )
    await scheduler.release(held[1])
    assert isinstance(await scheduler.admission("big"), Admission)
    assert await queue_order(scheduler) == ["small"]


async def test_a_head_over_its_quota_is_refused_and_blocks_no_one(
    scheduler: Scheduler,
) -> None:
    held = await fill_gpus(scheduler)
    await admit(scheduler, "hog", kernel_id="h1")
    await admit(scheduler, "hog", kernel_id="h2")  # GPU quota 1: fine while h1 waits too
    await scheduler.release(held[0])
    assert isinstance(await scheduler.admission("h1"), Admission)
    with pytest.raises(QuotaExceeded) as over:  # h2's turn came with hog holding 1 GPU
        await scheduler.admission("h2")
    assert over.value.message == (
        "GPU quota: 1 of 1 GPUs in use by you. Shut down a GPU kernel first."
    )
    bob = await admit(scheduler, "bob", kernel_id="b1")
    assert isinstance(bob, Queued) and bob.position == 1
    await scheduler.release(held[1])
    assert isinstance(await scheduler.admission("b1"), Admission)


async def test_time_out_says_why_and_where_the_user_stood(
    scheduler: Scheduler, clock: ManualClock, client: httpx.AsyncClient
) -> None:
    await fill_gpus(scheduler)
    await admit(scheduler, "alice", kernel_id="a1")
    queued = await admit(scheduler, "bob", kernel_id="b1", wait_s=30)
    assert isinstance(queued, Queued) and queued.deadline == clock.now + 30
    clock.advance(29)
    assert await scheduler.expire_queues() == []
    clock.advance(1)
    expired = await scheduler.expire_queues()
    assert [(o.kernel_id, o.decision) for o in expired] == [("b1", "timed_out")]
    expected = "All 2 GPUs are in use; you were 2nd in line. Try again, or pick python-cpu."
    with pytest.raises(QueueTimedOut) as timed_out:
        await scheduler.admission("b1")
    assert timed_out.value.message == expected
    answer = await client.get("/v1/admissions/b1")
    assert (answer.status_code, answer.json()) == (
        409,
        {"error": "queue_timeout", "message": expected},
    )
    clock.advance(31)  # the longest wait is kernel_launch_timeout (60 s)
    assert [o.kernel_id for o in await scheduler.expire_queues()] == ["a1"]


async def test_a_client_that_gave_up_leaves_the_queue(
    scheduler: Scheduler, clock: ManualClock, client: httpx.AsyncClient
) -> None:
    await fill_gpus(scheduler)
    for user in ("alice", "bob", "carol"):
        await admit(scheduler, user, kernel_id=user)
    withdrawn = await client.delete("/v1/admissions/alice")
    assert withdrawn.json() == {"left_queue": True, "released": False}
    assert await queue_order(scheduler) == ["bob", "carol"]
    gone = await client.get("/v1/admissions/alice")
    assert gone.status_code == 410 and gone.json()["error"] == "queue_left"

    await scheduler.expire_queues()  # heartbeats count from the first sweep
    clock.advance(20)
    assert (await client.get("/v1/admissions/carol")).status_code == 202  # carol still asks
    clock.advance(11)
    expired = await scheduler.expire_queues()  # bob has not asked for 31 s: he gave up
    assert [(o.kernel_id, o.decision) for o in expired] == [("bob", "abandoned")]
    assert await queue_order(scheduler) == ["carol"]


async def test_queued_requests_count_against_the_kernel_quota(scheduler: Scheduler) -> None:
    await fill_gpus(scheduler)
    await admit(scheduler, "alice", "python-cpu", wait_s=0)
    await admit(scheduler, "alice", groups=["team"])
    await admit(scheduler, "alice", groups=["team"])
    with pytest.raises(QuotaExceeded) as refused:
        await admit(scheduler, "alice", "python-cpu", wait_s=0)
    assert refused.value.message == (
        "You already have 1 of 3 kernels running and 2 waiting for a pool. "
        "Shut one down from the Running panel, or wait."
    )


async def test_asking_again_keeps_the_place(scheduler: Scheduler) -> None:
    await fill_gpus(scheduler)
    first = await admit(scheduler, "alice", kernel_id="same")
    await admit(scheduler, "bob")
    again = await admit(scheduler, "alice", kernel_id="same")
    assert first == again and isinstance(again, Queued) and again.position == 1


async def test_withdrawing_an_admitted_request_releases_its_lease(scheduler: Scheduler) -> None:
    held = await fill_gpus(scheduler)
    await admit(scheduler, "alice", kernel_id="late")
    await scheduler.release(held[0])  # admitted while the gateway was giving up
    assert await scheduler.withdraw("late") == (False, True)
    assert await scheduler.leases.get("late") is None
    assert await scheduler.withdraw("late") == (False, False)  # idempotent
    with pytest.raises(UnknownAdmission) as gone:
        await scheduler.admission("late")
    assert gone.value.message == (
        "Kernel late was admitted from the queue and has been released since."
    )


async def test_an_admission_from_the_queue_between_two_reads_is_an_admission(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by CI: the gateway's poll read the lease (none yet), the head was admitted, then
    # it read the entry ("admitted") and told the user the kernel had been released since.
    held = await fill_gpus(scheduler)
    await admit(scheduler, "alice", kernel_id="polled")
    read_entry = scheduler.queue.entry

    async def promoted_meanwhile(kernel_id: str, **kwargs: object) -> object:
        await scheduler.release(held[0])  # room: PROMOTE admits the head right now
        return await read_entry(kernel_id, **kwargs)

    monkeypatch.setattr(scheduler.queue, "entry", promoted_meanwhile)
    admitted = await scheduler.admission("polled")
    assert isinstance(admitted, Admission) and admitted.lease.kernel_id == "polled"
    assert admitted.env == {"CUDA_VISIBLE_DEVICES": "0"}


async def test_queue_over_http(
    scheduler: Scheduler, client: httpx.AsyncClient, clock: ManualClock
) -> None:
    await fill_gpus(scheduler)
    body = {"kernel_id": "k-bob", "user": "bob", "groups": ["ml"], "kernelspec": "python-gpu"}
    queued = await client.post("/v1/admissions", json=body, params={"wait_s": 45})
    assert queued.status_code == 202
    assert queued.json() == {
        "decision": "queued",
        "kernel_id": "k-bob",
        "pool": "gpu",
        "position": 1,
        "deadline": clock.now + 45,
        "message": "Waiting for pool gpu: you are 1st in line.",
    }
    refused = await client.post("/v1/admissions", json={**body, "kernel_id": "k-now"})
    assert refused.status_code == 409 and refused.json()["error"] == "pool_full"
    mine = (await client.get("/v1/users/bob/queue")).json()
    assert [(e["kernel_id"], e["position"], e["message"]) for e in mine["entries"]] == [
        ("k-bob", 1, "Waiting for pool gpu: you are 1st in line.")
    ]
    queues = {q["pool"]: q for q in (await client.get("/v1/queues")).json()["queues"]}
    assert queues["gpu"]["length"] == 1 and queues["cpu"] == {
        "pool": "cpu",
        "length": 0,
        "entries": [],
    }
    pools = {p["name"]: p for p in (await client.get("/v1/pools")).json()["pools"]}
    assert pools["gpu"]["queued"] == 1
    assert (
        'kernelfleet_scheduler_queue_length{pool="gpu"} 1.0' in (await client.get("/metrics")).text
    )
    lease = (await client.get("/v1/leases", params={"pool": "gpu"})).json()["leases"][0]
    clock.advance(12)
    assert (await client.delete(f"/v1/leases/{lease['kernel_id']}")).json() == {"released": True}
    admitted = await client.get("/v1/admissions/k-bob")
    assert admitted.status_code == 200 and admitted.json()["lease"]["waited"] == 12
    assert admitted.json()["env"] == {"CUDA_VISIBLE_DEVICES": str(lease["gpu_devices"][0])}
    text = (await client.get("/metrics")).text
    assert (
        'kernelfleet_scheduler_admissions_total{decision="queued",reason="pool_full"} 1.0' in text
    )
    assert 'kernelfleet_scheduler_admissions_total{decision="admitted",reason="queue"} 1.0' in text
    waited = 'queue_wait_seconds_bucket{le="20.0",outcome="admitted",pool="gpu"} 1.0'
    assert f"kernelfleet_scheduler_{waited}" in text
    assert (await client.get("/v1/users/bob/queue")).json() == {"user": "bob", "entries": []}
