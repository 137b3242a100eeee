"""Warm leases and claims against a real Redis: capacity held, no quota, one user once.

EG admits each warm kernel as the warm pools' owner (``POST /v1/warm-pools/{k}/kernels``);
a user's start claims one (``POST /v1/warm-pools/{k}/claims``). These tests go through the
scheduler's HTTP app (in process) with a clock they move.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from kernelfleet.kernelspecs.spec import WarmAuto
from scheduler.app import create_app
from scheduler.eviction import Evictor
from scheduler.kubernetes_warm import live_targets
from scheduler.service import Scheduler
from scheduler.warm import WARM_USER, WarmTargets
from tests.support.scheduler_setup import KERNELSPECS, PLATFORM, ManualClock, admit

MakeScheduler = Callable[..., Scheduler]
AUTH = {"Authorization": "token t"}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def scheduler(make_scheduler: MakeScheduler, clock: ManualClock) -> Scheduler:
    return make_scheduler(PLATFORM, KERNELSPECS, clock=clock)


@pytest.fixture
async def ops(scheduler: Scheduler) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(scheduler, token="t"))
    async with httpx.AsyncClient(transport=transport, base_url="http://s", headers=AUTH) as c:
        yield c


def new_id() -> str:
    return str(uuid.uuid4())


async def warm(ops: httpx.AsyncClient, kernelspec: str = "python-gpu") -> str:
    kernel_id = new_id()
    answer = await ops.post(f"/v1/warm-pools/{kernelspec}/kernels", json={"kernel_id": kernel_id})
    assert answer.status_code == 201, answer.text
    return kernel_id


async def claim(
    ops: httpx.AsyncClient, kernel_id: str, user: str, groups: list[str] | None = None,
    kernelspec: str = "python-gpu",
) -> httpx.Response:  # fmt: skip
    body = {"kernel_id": kernel_id, "user": user, "groups": groups or ["ml"]}
    return await ops.post(f"/v1/warm-pools/{kernelspec}/claims", json=body)


async def usage(ops: httpx.AsyncClient, user: str) -> dict[str, float]:
    return (await ops.get(f"/v1/users/{user}/usage", params={"groups": ["ml"]})).json()["used"]


async def pool_used(ops: httpx.AsyncClient, pool: str) -> dict[str, float]:
    pools = (await ops.get("/v1/pools")).json()["pools"]
    return next(p["used"] for p in pools if p["name"] == pool)


async def test_warm_kernels_hold_the_pool_but_no_quota_and_are_reported(
    ops: httpx.AsyncClient,
) -> None:
    first, second = await warm(ops), await warm(ops)
    assert (await pool_used(ops, "gpu"))["gpus"] == 2  # the pool's two GPUs are held...
    full = await ops.post("/v1/warm-pools/python-gpu/kernels", json={"kernel_id": new_id()})
    assert full.status_code == 409 and full.json()["error"] == "pool_full"
    alice_used = await usage(ops, "alice")
    assert alice_used["kernels"] == 0 and alice_used["gpus"] == 0  # ...by nobody's quota
    pools = {t["kernelspec"]: t for t in (await ops.get("/v1/warm-pools")).json()["warm_pools"]}
    assert pools["python-gpu"]["ready"] == 2 and pools["python-cpu"]["ready"] == 0
    leases = (await ops.get("/v1/leases", params={"user": WARM_USER})).json()["leases"]
    assert {lease["kernel_id"] for lease in leases} == {first, second}
    gpus = sorted(d for lease in leases for d in lease["gpu_devices"])
    assert gpus == [0, 1]  # each warm GPU kernel holds its own device


async def test_a_claim_moves_the_kernel_to_its_user_once(
    ops: httpx.AsyncClient, clock: ManualClock
) -> None:
    kernel_id = await warm(ops)
    clock.advance(3600)  # warm for an hour: none of it is the user's
    answer = await claim(ops, kernel_id, "alice")
    assert answer.status_code == 200, answer.text
    lease = answer.json()["lease"]
    assert lease["user"] == "alice" and lease["created"] == pytest.approx(clock.now)
    assert answer.json()["env"]["CUDA_VISIBLE_DEVICES"] == str(lease["gpu_devices"][0])
    used = await usage(ops, "alice")
    assert used["kernels"] == 1 and used["gpus"] == 1 and used["gpu_hours"] == 0
    assert (await pool_used(ops, "gpu"))["gpus"] == 1  # unchanged by the claim
    again = await claim(ops, kernel_id, "bob")
    assert again.status_code == 409 and again.json()["error"] == "warm_taken"
    ready = {t["kernelspec"]: t["ready"] for t in (await ops.get("/v1/warm-pools")).json()[
        "warm_pools"]}  # fmt: skip
    assert ready["python-gpu"] == 0
    released = await ops.delete(f"/v1/leases/{kernel_id}")  # the user's kernel stops
    assert released.json()["released"] is True
    assert (await usage(ops, "alice"))["gpus"] == 0
    assert (await pool_used(ops, "gpu"))["gpus"] == 0


async def test_a_claim_beyond_the_users_quota_is_refused_and_the_kernel_stays_warm(
    ops: httpx.AsyncClient, scheduler: Scheduler
) -> None:
    await admit(scheduler, "alice", "python-gpu", wait_s=0)  # ml: 1 GPU, now used
    kernel_id = await warm(ops)
    refused = await claim(ops, kernel_id, "alice")
    assert refused.status_code == 403 and refused.json()["error"] == "quota_exceeded"
    assert "GPU" in refused.json()["message"]
    assert (await claim(ops, kernel_id, "bob")).status_code == 200  # still warm for bob


async def test_claims_for_a_forbidden_or_other_kernelspec_are_refused(
    ops: httpx.AsyncClient,
) -> None:
    kernel_id = await warm(ops)
    forbidden = await claim(ops, kernel_id, "dave", groups=["students"])
    assert forbidden.status_code == 403 and forbidden.json()["error"] == "kernelspec_forbidden"
    other = await claim(ops, kernel_id, "alice", kernelspec="python-gpu-2")
    assert other.status_code == 409 and other.json()["error"] == "warm_taken"
    gone = await claim(ops, new_id(), "alice")
    assert gone.status_code == 404


async def test_the_warm_owner_is_not_a_user_one_can_admit(ops: httpx.AsyncClient) -> None:
    body = {"kernel_id": new_id(), "user": WARM_USER, "kernelspec": "python-cpu"}
    answer = await ops.post("/v1/admissions", json=body)
    assert answer.status_code == 400 and "warm-pools" in answer.json()["message"]


async def test_users_waiting_for_a_pool_turn_its_warm_targets_to_zero(
    ops: httpx.AsyncClient, scheduler: Scheduler
) -> None:
    await ops.put("/v1/warm-pools/python-gpu", json={"target": 2})
    await warm(ops), await warm(ops)
    queued = await admit(scheduler, "alice", "python-gpu", wait_s=60)
    assert not hasattr(queued, "lease")  # the warm kernels hold both GPUs: alice waits
    found = {t["kernelspec"]: t for t in (await ops.get("/v1/warm-pools")).json()["warm_pools"]}
    assert (found["python-gpu"]["target"], found["python-gpu"]["source"]) == (0, "pressure")
    assert found["python-gpu"]["ready"] == 2  # EG stops them; alice is then admitted
    assert found["python-cpu"]["source"] != "pressure"  # other pools keep theirs
    behind = await ops.post("/v1/warm-pools/python-gpu/kernels", json={"kernel_id": new_id()})
    assert behind.status_code == 409  # no warm kernel jumps the queue


async def test_warm_kernels_are_not_idle_evicted_and_are_not_demand(
    make_scheduler: MakeScheduler, clock: ManualClock
) -> None:
    auto = WarmAuto(min=0, max=2, cold_start=600, window=600)
    specs = {**KERNELSPECS, "python-cpu": KERNELSPECS["python-cpu"].model_copy(
        update={"warm_auto": auto, "idle_timeout": 60, "warning_before": 10})}  # fmt: skip
    scheduler = make_scheduler(PLATFORM, specs, clock=clock)
    transport = httpx.ASGITransport(app=create_app(scheduler, token="t"))
    async with httpx.AsyncClient(transport=transport, base_url="http://s", headers=AUTH) as c:
        for _ in range(2):
            await warm(c, "python-cpu")
        found = {t["kernelspec"]: t for t in (await c.get("/v1/warm-pools")).json()["warm_pools"]}
        assert found["python-cpu"]["target"] == 0  # refills are not starts by users
    clock.advance(3600)  # an hour idle: a user's kernel would be warned and evicted

    class Gateway:
        async def shutdown(self, kernel_id: str) -> None:
            raise AssertionError(f"evicted warm kernel {kernel_id}")

        async def notice(self, kernel_id: str, text: str) -> int:
            raise AssertionError(f"warned warm kernel {kernel_id}")

    evictor = Evictor(scheduler, Gateway(), kernelspecs=specs)
    assert await evictor.sweep() == []
    assert len(await scheduler.leases.list(user=WARM_USER)) == 2


async def test_kubernetes_placeholders_follow_the_targets_ops_pin(
    ops: httpx.AsyncClient, scheduler: Scheduler
) -> None:
    read = live_targets(WarmTargets(
        scheduler.redis, kernelspecs=scheduler.admitter.kernelspecs, pools=scheduler.pools,
        location=scheduler.location, leases=scheduler.leases,
    ))  # fmt: skip
    assert await read() == {"cpu": 0, "gpu": 0}  # the specs' defaults
    await ops.put("/v1/warm-pools/python-gpu", json={"target": 1})
    await ops.put("/v1/warm-pools/python-cpu", json={"target": 2})
    assert await read() == {"cpu": 2, "gpu": 1}
