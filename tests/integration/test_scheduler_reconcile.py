"""Reconciliation against a real Redis and a stand-in EG, with a clock the test moves."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import httpx
import pytest

from scheduler.admission import Admission
from scheduler.errors import GatewayUnavailable
from scheduler.loops import Loops
from scheduler.reconcile import EnterpriseGatewayClient, Reconciler
from scheduler.service import Scheduler
from tests.support.scheduler_setup import (
    KERNELSPECS,
    PLATFORM,
    FakeGateway,
    ManualClock,
    admit,
    fill_gpus,
)

MakeScheduler = Callable[..., Scheduler]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def scheduler(make_scheduler: MakeScheduler, clock: ManualClock) -> Scheduler:
    return make_scheduler(PLATFORM, KERNELSPECS, clock=clock)


def fixes(scheduler: Scheduler) -> str:
    return scheduler.metrics.render().decode()


async def test_orphans_on_both_sides_are_fixed_after_their_grace(
    scheduler: Scheduler, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    kept = await admit(scheduler, "alice", "python-cpu", wait_s=0)
    lost = await admit(scheduler, "bob", "python-cpu", wait_s=0)
    assert isinstance(kept, Admission) and isinstance(lost, Admission)
    gateway = FakeGateway({kept.lease.kernel_id, "stray"})
    reconciler = Reconciler(
        scheduler, gateway, lease_grace_s=30, kernel_grace_s=60, launch_timeout_s=60
    )
    first = await reconciler.run_once()  # lost is young: it may still be launching
    assert (first.released, first.shut_down) == ([], [])
    clock.advance(60)
    second = await reconciler.run_once()  # lost now counts as missing; stray waits 60 s
    assert (second.released, second.shut_down) == ([], ["stray"])
    clock.advance(29)
    assert (await reconciler.run_once()).released == []
    clock.advance(1)
    with caplog.at_level(logging.WARNING, logger="scheduler.reconcile"):
        third = await reconciler.run_once()
    assert third.released == [lost.lease.kernel_id]
    assert f"released the lease of kernel {lost.lease.kernel_id}" in caplog.text
    assert gateway.stopped == ["stray"]
    assert [x.kernel_id for x in await scheduler.leases.list()] == [kept.lease.kernel_id]
    stopped = await scheduler.leases.list(state="stopped")
    assert [(x.kernel_id, x.stop_reason) for x in stopped] == [(lost.lease.kernel_id, "reconciled")]
    text = fixes(scheduler)
    assert 'reconcile_fixes_total{kind="lease_released"} 1.0' in text
    assert 'reconcile_fixes_total{kind="kernel_shutdown"} 1.0' in text


async def test_a_kernel_seen_without_a_lease_once_is_not_stopped(
    scheduler: Scheduler, clock: ManualClock
) -> None:
    gateway = FakeGateway({"k"})
    reconciler = Reconciler(scheduler, gateway, kernel_grace_s=60)
    await reconciler.run_once()
    gateway.kernels.clear()  # it ended (its lease was released meanwhile)
    clock.advance(30)
    await reconciler.run_once()
    gateway.kernels.add("k")
    clock.advance(45)
    assert (await reconciler.run_once()).shut_down == []  # its grace started again


async def test_nothing_is_touched_when_eg_cannot_be_asked(
    scheduler: Scheduler, clock: ManualClock
) -> None:
    held = await fill_gpus(scheduler)
    await admit(scheduler, "carol", kernel_id="waiting")
    gateway = FakeGateway()
    gateway.down = True
    reconciler = Reconciler(scheduler, gateway, lease_grace_s=0, launch_timeout_s=0)
    clock.advance(3600)
    assert (await reconciler.run_once()).skipped
    assert len(await scheduler.leases.list()) == 2
    assert 'reconcile_runs_total{outcome="skipped"} 1.0' in fixes(scheduler)
    gateway.down = False
    released = (await reconciler.run_once()).released
    assert sorted(released) == sorted(held)
    lease = await scheduler.leases.get("waiting")  # freed room went to the queue's head
    assert lease is not None and lease.state == "starting"


async def test_the_reconcile_loop_survives_failures(scheduler: Scheduler) -> None:
    gateway = FakeGateway()
    gateway.down = True
    loops = Loops(scheduler, reconciler=Reconciler(scheduler, gateway))
    assert await loops.run_step("reconcile")  # skipped rounds are not failures
    await scheduler.redis.connection_pool.disconnect()

    async def broken() -> set[str]:
        raise RuntimeError("bug")

    gateway.kernel_ids = broken  # type: ignore[method-assign]
    assert not await loops.run_step("reconcile")
    assert 'loop_errors_total{loop="reconcile"} 1.0' in fixes(scheduler)


async def test_eg_client_lists_and_stops_kernels_with_the_service_token() -> None:
    seen: list[tuple[str, str, str]] = []

    def eg(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, request.headers["Authorization"]))
        if request.method == "GET":
            return httpx.Response(200, json=[{"id": "a", "name": "python-cpu"}, {"id": "b"}])
        if request.url.path.endswith("/gone"):
            return httpx.Response(404, json={"message": "no such kernel"})
        if request.url.path.endswith("/broken"):
            return httpx.Response(500, content=json.dumps({"message": "oops"}))
        return httpx.Response(204)

    client = EnterpriseGatewayClient("http://eg/", "svc", transport=httpx.MockTransport(eg))
    assert await client.kernel_ids() == {"a", "b"}
    await client.shutdown("a")
    await client.shutdown("gone")  # already gone is fine
    with pytest.raises(GatewayUnavailable):
        await client.shutdown("broken")
    assert seen[:2] == [
        ("GET", "/api/kernels", "token svc"),
        ("DELETE", "/api/kernels/a", "token svc"),
    ]
    await client.aclose()
    refused = EnterpriseGatewayClient(
        "http://eg", "bad", transport=httpx.MockTransport(lambda r: httpx.Response(401))
    )
    with pytest.raises(GatewayUnavailable) as info:
        await refused.kernel_ids()
    assert "HTTP 401" in info.value.message
    await refused.aclose()
