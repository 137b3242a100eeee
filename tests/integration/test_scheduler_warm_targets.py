"""Warm-pool targets: spec defaults, pinned by ops in Redis, bounded by the pool."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from kernelfleet.kernelspecs.spec import WarmAuto
from kernelfleet.warm_cmd import targets_table
from scheduler.admission import Admission
from scheduler.app import create_app
from scheduler.service import Scheduler
from scheduler.warm import auto_target
from tests.support.scheduler_setup import KERNELSPECS, PLATFORM, ManualClock, admit

MakeScheduler = Callable[..., Scheduler]
SPECS = {
    **KERNELSPECS,
    "python-gpu": KERNELSPECS["python-gpu"].model_copy(update={"warm_target": 1}),
}


@pytest.fixture
async def client(make_scheduler: MakeScheduler) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_scheduler(PLATFORM, SPECS), token="t")
    transport = httpx.ASGITransport(app=app)
    auth = {"Authorization": "token t"}
    async with httpx.AsyncClient(transport=transport, base_url="http://s", headers=auth) as c:
        yield c


async def targets(client: httpx.AsyncClient) -> dict[str, tuple[int, str]]:
    found = (await client.get("/v1/warm-pools")).json()["warm_pools"]
    return {t["kernelspec"]: (t["target"], t["source"]) for t in found}


async def test_spec_defaults_then_pinned_values_survive_a_new_scheduler(
    client: httpx.AsyncClient, make_scheduler: MakeScheduler
) -> None:
    assert (await targets(client))["python-gpu"] == (1, "spec")
    answer = await client.put("/v1/warm-pools/python-gpu", json={"target": 2})
    assert answer.status_code == 200 and answer.json()["target"] == 2
    other = create_app(make_scheduler(PLATFORM, SPECS), token="t")  # another replica
    transport = httpx.ASGITransport(app=other)
    auth = {"Authorization": "token t"}
    async with httpx.AsyncClient(transport=transport, base_url="http://s", headers=auth) as c:
        assert (await targets(c))["python-gpu"] == (2, "manual")
    assert (await client.delete("/v1/warm-pools/python-gpu")).json()["target"] == 1
    assert (await targets(client))["python-gpu"] == (1, "spec")


async def test_targets_beyond_the_pool_or_unknown_kernelspecs_are_refused(
    client: httpx.AsyncClient,
) -> None:
    too_many = await client.put("/v1/warm-pools/python-gpu", json={"target": 3})
    assert too_many.status_code == 400 and too_many.json()["error"] == "bad_warm_target"
    assert "between 0 and 2" in too_many.json()["message"]  # the gpu pool has 2 GPUs
    unknown = await client.put("/v1/warm-pools/nope", json={"target": 1})
    assert unknown.status_code == 400 and "python-cpu" in unknown.json()["message"]
    negative = await client.put("/v1/warm-pools/python-cpu", json={"target": -1})
    assert negative.status_code == 422  # the API's validation error


async def test_the_cli_table(client: httpx.AsyncClient) -> None:
    found = (await client.get("/v1/warm-pools")).json()["warm_pools"]
    lines = targets_table(found).splitlines()
    assert lines[0].split() == ["KERNELSPEC", "POOL", "TARGET", "SOURCE", "READY", "SPEC", "MOST"]
    assert any(line.split()[:4] == ["python-gpu", "gpu", "1", "spec"] for line in lines)


def test_auto_target_formula() -> None:
    auto = WarmAuto(min=1, max=3, cold_start=10, window=600)
    assert auto_target(starts=0, auto=auto, most=8) == 1  # the floor
    assert auto_target(starts=60, auto=auto, most=8) == 1  # 0.1/s x 10 s
    assert auto_target(starts=61, auto=auto, most=8) == 2  # rounds up
    assert auto_target(starts=600, auto=auto, most=8) == 3  # the ceiling
    assert auto_target(starts=600, auto=auto, most=2) == 2  # the pool


async def test_auto_mode_follows_recent_starts_until_pinned(make_scheduler: MakeScheduler) -> None:
    auto = WarmAuto(min=0, max=4, cold_start=60, window=600)
    specs = {**KERNELSPECS, "python-cpu": KERNELSPECS["python-cpu"].model_copy(
        update={"warm_auto": auto})}  # fmt: skip
    clock = ManualClock()
    scheduler = make_scheduler(PLATFORM, specs, clock=clock)
    transport = httpx.ASGITransport(app=create_app(scheduler, token="t"))
    auth = {"Authorization": "token t"}
    async with httpx.AsyncClient(transport=transport, base_url="http://s", headers=auth) as c:
        assert (await targets(c))["python-cpu"] == (0, "auto")
        for user in ("a", "b", "c"):  # 3 starts in 10 min x 60 s cold start = 0.3 -> 1
            await admit(scheduler, user, "python-cpu", wait_s=0)
        assert (await targets(c))["python-cpu"] == (1, "auto")
        for n in range(12):  # 15 starts, most stopped since: 1.5 -> 2
            started = await admit(scheduler, f"u{n}", "python-cpu", wait_s=0)
            assert isinstance(started, Admission)
            await scheduler.release(started.lease.kernel_id)
        assert (await targets(c))["python-cpu"] == (2, "auto")
        clock.advance(601)  # the window slid past them
        assert (await targets(c))["python-cpu"] == (0, "auto")
        await c.put("/v1/warm-pools/python-cpu", json={"target": 3})
        assert (await targets(c))["python-cpu"] == (3, "manual")
