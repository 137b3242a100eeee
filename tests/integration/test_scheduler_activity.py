"""Lease states from the gateway's activity reports: starting -> idle/busy -> stopped."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from scheduler.admission import Admission, Queued
from scheduler.app import create_app
from scheduler.service import Scheduler
from tests.support.scheduler_setup import (
    KERNELSPECS,
    PLATFORM,
    ManualClock,
    admit,
    fill_gpus,
)

TOKEN = "activity-test-token"
AUTH = {"Authorization": f"token {TOKEN}"}
MakeScheduler = Callable[..., Scheduler]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def scheduler(make_scheduler: MakeScheduler, clock: ManualClock) -> Scheduler:
    return make_scheduler(PLATFORM, KERNELSPECS, clock=clock)


@pytest.fixture
async def client(scheduler: Scheduler) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(scheduler, token=TOKEN))
    async with httpx.AsyncClient(transport=transport, base_url="http://s", headers=AUTH) as c:
        yield c


def report(kernel_id: str, state: str, last: float | None = None, connections: int = 0) -> dict:
    return {
        "kernel_id": kernel_id,
        "execution_state": state,
        "last_activity": last,
        "connections": connections,
    }


async def states(client: httpx.AsyncClient) -> dict[str, tuple[str, float, int]]:
    leases = (await client.get("/v1/leases")).json()["leases"]
    return {x["kernel_id"]: (x["state"], x["last_activity"], x["connections"]) for x in leases}


async def test_reports_move_lease_states(
    scheduler: Scheduler, client: httpx.AsyncClient, clock: ManualClock
) -> None:
    start = clock.now
    a = await admit(scheduler, "alice", "python-cpu", wait_s=0, kernel_id="a")
    b = await admit(scheduler, "bob", "python-cpu", wait_s=0, kernel_id="b")
    assert isinstance(a, Admission) and isinstance(b, Admission)
    assert await states(client) == {"a": ("starting", start, 0), "b": ("starting", start, 0)}
    clock.advance(10)
    batch = [
        report("a", "busy", start + 9, 1),
        report("b", "idle", start + 8),
        report("gone", "idle", start),
    ]
    answer = await client.put("/v1/activity", json={"kernels": batch})
    assert answer.json() == {"updated": 2, "released": [], "unknown": ["gone"]}
    assert await states(client) == {"a": ("busy", start + 9, 1), "b": ("idle", start + 8, 0)}
    pool = (await client.get("/v1/pools")).json()["pools"][0]
    assert pool["states"] == {"busy": 1, "idle": 1}

    # a report is a snapshot: applying it again changes nothing; activity never goes back
    await client.put("/v1/activity", json={"kernels": batch})
    older = [report("a", "idle", start + 1, 2), report("b", "restarting", None)]
    await client.put("/v1/activity", json={"kernels": older})
    assert await states(client) == {"a": ("idle", start + 9, 2), "b": ("starting", start + 8, 0)}
    busy = await client.get("/v1/leases", params={"state": "idle"})
    assert [x["kernel_id"] for x in busy.json()["leases"]] == ["a"]
    text = (await client.get("/metrics")).text
    assert 'kernelfleet_scheduler_leases{pool="cpu",state="idle"} 1.0' in text
    assert 'kernelfleet_scheduler_leases{pool="cpu",state="starting"} 1.0' in text
    assert 'kernelfleet_scheduler_activity_reports_total{result="updated"} 6.0' in text


async def test_a_dead_kernel_releases_its_lease_and_the_queue_moves(
    scheduler: Scheduler, client: httpx.AsyncClient, clock: ManualClock
) -> None:
    held = await fill_gpus(scheduler)
    waiting = await admit(scheduler, "carol", kernel_id="c1")
    assert isinstance(waiting, Queued)
    clock.advance(3)
    answer = await client.put("/v1/activity", json={"kernels": [report(held[0], "dead")]})
    assert answer.json() == {"updated": 0, "released": [held[0]], "unknown": []}
    admitted = await client.get("/v1/admissions/c1")  # freed in the same request
    assert admitted.status_code == 200 and admitted.json()["lease"]["waited"] == 3
    stopped = (await client.get("/v1/leases", params={"state": "stopped"})).json()["leases"]
    assert [(x["kernel_id"], x["state"], x["stop_reason"], x["stopped"]) for x in stopped] == [
        (held[0], "stopped", "died", clock.now)
    ]
    again = await client.put("/v1/activity", json={"kernels": [report(held[0], "dead")]})
    assert again.json() == {"updated": 0, "released": [], "unknown": []}  # nothing left
    assert len((await client.get("/v1/leases", params={"pool": "gpu"})).json()["leases"]) == 2


async def test_activity_needs_the_service_token_and_valid_reports(
    client: httpx.AsyncClient,
) -> None:
    bad = await client.put("/v1/activity", json={"kernels": [report("../x", "idle")]})
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_request"
    negative = await client.put(
        "/v1/activity", json={"kernels": [report("k", "idle", connections=-1)]}
    )
    assert negative.status_code == 422
    anonymous = await client.put(
        "/v1/activity", json={"kernels": []}, headers={"Authorization": ""}
    )
    assert anonymous.status_code == 401
