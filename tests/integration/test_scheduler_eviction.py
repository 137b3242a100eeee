"""Idle and pressure eviction against a real Redis, a stand-in EG and a clock the test moves."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from kernelfleet.evictions_cmd import evictions_table
from kernelfleet.kernelspecs.spec import KernelSpec
from scheduler.activity import Report
from scheduler.admission import Admission, Queued
from scheduler.app import create_app
from scheduler.errors import GatewayUnavailable
from scheduler.eviction import Evictor
from scheduler.service import Scheduler
from tests.support.scheduler_setup import PLATFORM, ManualClock, admit

MakeScheduler = Callable[..., Scheduler]
GIB = 2**30


def _spec(name: str, pool: str, *, gpus: int, connected: bool) -> KernelSpec:
    return KernelSpec(
        name=name, display_name=name, pool=pool, groups=["*"],
        resources={"cpus": 1, "memory": 2 * GIB, "gpus": gpus},
        idle_timeout=1800, max_lifetime=12 * 3600, warning_before=300,
        evict_connected_idle=connected,
    )  # fmt: skip


KERNELSPECS = {
    "python-gpu": _spec("python-gpu", "gpu", gpus=1, connected=True),
    "python-cpu": _spec("python-cpu", "cpu", gpus=0, connected=False),
}


class NoticeGateway:
    """EG as far as eviction sees it: notices received per kernel, shutdowns, can be down."""

    def __init__(self) -> None:
        self.notices: dict[str, list[str]] = {}
        self.stopped: list[str] = []
        self.down = False

    async def shutdown(self, kernel_id: str) -> None:
        if self.down:
            raise GatewayUnavailable("EG is down")
        self.stopped.append(kernel_id)

    async def notice(self, kernel_id: str, text: str) -> int:
        if self.down:
            raise GatewayUnavailable("EG is down")
        self.notices.setdefault(kernel_id, []).append(text)
        return 1


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def scheduler(make_scheduler: MakeScheduler, clock: ManualClock) -> Scheduler:
    return make_scheduler(PLATFORM, KERNELSPECS, clock=clock)


@pytest.fixture
def gateway() -> NoticeGateway:
    return NoticeGateway()


@pytest.fixture
def evictor(scheduler: Scheduler, gateway: NoticeGateway) -> Evictor:
    return Evictor(scheduler, gateway, kernelspecs=KERNELSPECS)


async def started(scheduler: Scheduler, user: str, kernelspec: str = "python-gpu") -> str:
    admitted = await admit(scheduler, user, kernelspec, wait_s=0)
    assert isinstance(admitted, Admission)
    return admitted.lease.kernel_id


async def report(scheduler: Scheduler, kernel_id: str, state: str, *, connections: int = 1) -> None:
    now = scheduler.clock()
    await scheduler.report_activity([Report(kernel_id, state, now, connections)])


async def test_idle_gpu_kernel_is_warned_then_evicted_and_recorded(
    scheduler: Scheduler, evictor: Evictor, gateway: NoticeGateway, clock: ManualClock
) -> None:
    kernel = await started(scheduler, "carol")
    await report(scheduler, kernel, "idle")  # an open tab: connected, but silent
    clock.advance(24 * 60)
    assert await evictor.sweep() == [] and gateway.notices == {}
    clock.advance(60)  # 25 min idle: 5 min before the eviction
    assert await evictor.sweep() == []
    [warning] = gateway.notices[kernel]
    assert "idle for 25 minutes" in warning and "in 5 minutes to free the GPU" in warning
    clock.advance(60)
    assert await evictor.sweep() == [] and len(gateway.notices[kernel]) == 1  # warned once
    clock.advance(4 * 60)
    [evicted] = await evictor.sweep()
    assert gateway.stopped == [kernel]
    assert (evicted.user, evicted.kernelspec, evicted.reason) == ("carol", "python-gpu", "idle")
    assert evicted.idle_s == 30 * 60 and evicted.gpu_hours_freed == 0.5
    assert await scheduler.leases.get(kernel) is None
    assert [e.kernel_id for e in await evictor.store.list()] == [kernel]
    assert 'evictions_total{reason="idle"} 1.0' in scheduler.metrics.render().decode()

    clock.advance(60)  # her next kernel start gets the note, once
    again = await started(scheduler, "carol")
    await evictor.sweep()
    await evictor.sweep()
    [note] = gateway.notices[again]
    assert note.startswith("Your python-gpu kernel was stopped at ")
    assert note.endswith(" after 30 min idle.")


async def test_busy_kernel_is_not_idle_evicted_but_stops_at_max_lifetime(
    scheduler: Scheduler, evictor: Evictor, gateway: NoticeGateway, clock: ManualClock
) -> None:
    kernel = await started(scheduler, "carol")
    await report(scheduler, kernel, "busy")  # a long training run, no output
    clock.advance(11 * 3600 + 56 * 60)
    assert await evictor.sweep() == []
    assert "maximum lifetime" in gateway.notices[kernel][0]
    clock.advance(4 * 60)
    [evicted] = await evictor.sweep()
    assert evicted.reason == "max_lifetime" and gateway.stopped == [kernel]


async def test_running_a_cell_cancels_the_eviction(
    scheduler: Scheduler, evictor: Evictor, gateway: NoticeGateway, clock: ManualClock
) -> None:
    kernel = await started(scheduler, "carol")
    await report(scheduler, kernel, "idle")
    clock.advance(26 * 60)
    await evictor.sweep()
    assert len(gateway.notices[kernel]) == 1
    clock.advance(60)
    await report(scheduler, kernel, "busy")  # the user runs a cell
    await report(scheduler, kernel, "idle")
    clock.advance(4 * 60)  # past the warned deadline
    assert await evictor.sweep() == [] and gateway.stopped == []
    assert await evictor.store.warnings() == {}
    clock.advance(25 * 60)  # a new idle stretch is warned afresh
    await evictor.sweep()
    assert len(gateway.notices[kernel]) == 2


async def test_connected_cpu_kernel_is_kept_unconnected_one_is_evicted(
    scheduler: Scheduler, evictor: Evictor, gateway: NoticeGateway, clock: ManualClock
) -> None:
    tab_open = await started(scheduler, "alice", "python-cpu")
    tab_closed = await started(scheduler, "bob", "python-cpu")
    await report(scheduler, tab_open, "idle", connections=1)
    await report(scheduler, tab_closed, "idle", connections=0)
    clock.advance(26 * 60)
    await evictor.sweep()
    clock.advance(5 * 60)
    evicted = await evictor.sweep()
    assert [e.kernel_id for e in evicted] == [tab_closed] and tab_open not in gateway.notices


async def test_unwarned_kernel_is_never_evicted_while_eg_is_down(
    scheduler: Scheduler, evictor: Evictor, gateway: NoticeGateway, clock: ManualClock
) -> None:
    kernel = await started(scheduler, "carol")
    await report(scheduler, kernel, "idle")
    gateway.down = True
    clock.advance(40 * 60)
    assert await evictor.sweep() == []
    gateway.down = False
    assert await evictor.sweep() == []  # warned now, with the full 5 minutes
    assert "in 5 minutes" in gateway.notices[kernel][0]
    clock.advance(5 * 60)
    assert len(await evictor.sweep()) == 1


async def test_pressure_evicts_the_longest_idle_kernel_for_a_queued_user(
    scheduler: Scheduler, evictor: Evictor, gateway: NoticeGateway, clock: ManualClock
) -> None:
    older = await started(scheduler, "alice")
    await report(scheduler, older, "idle")
    clock.advance(60)
    newer = await started(scheduler, "bob")
    await report(scheduler, newer, "idle")
    clock.advance(9 * 60)  # alice idle 10 min, bob 9: both within their idle timeout
    waiting = await admit(scheduler, "dave", "python-gpu", wait_s=600)
    assert isinstance(waiting, Queued)
    await evictor.sweep()
    assert list(gateway.notices) == [older]
    assert "others are waiting" in gateway.notices[older][0]
    assert "shut down in 1 minute" in gateway.notices[older][0]
    clock.advance(60)
    [evicted] = await evictor.sweep()
    assert (evicted.kernel_id, evicted.reason) == (older, "pressure")
    admitted = await scheduler.admission(waiting.kernel_id)
    assert isinstance(admitted, Admission) and admitted.lease.gpus == 1
    assert await scheduler.leases.get(newer) is not None


async def test_no_pressure_eviction_within_the_grace(
    scheduler: Scheduler, evictor: Evictor, gateway: NoticeGateway, clock: ManualClock
) -> None:
    for user in ("alice", "bob"):
        await report(scheduler, await started(scheduler, user), "idle")
    clock.advance(5 * 60)
    assert isinstance(await admit(scheduler, "dave", "python-gpu", wait_s=600), Queued)
    await evictor.sweep()
    clock.advance(60)
    assert await evictor.sweep() == [] and gateway.notices == {}


async def test_evictions_are_listed_by_the_api_and_the_cli(
    scheduler: Scheduler, evictor: Evictor, clock: ManualClock
) -> None:
    for user in ("alice", "bob"):
        await report(scheduler, await started(scheduler, user), "idle", connections=0)
    clock.advance(25 * 60)
    await evictor.sweep()
    clock.advance(5 * 60)
    assert len(await evictor.sweep()) == 2
    app = create_app(scheduler, token="t")
    transport = httpx.ASGITransport(app=app)
    auth = {"Authorization": "token t"}
    async with httpx.AsyncClient(transport=transport, base_url="http://s", headers=auth) as c:
        everyone = (await c.get("/v1/evictions")).json()["evictions"]
        bobs = (await c.get("/v1/evictions", params={"user": "bob"})).json()["evictions"]
        refused = await c.get("/v1/evictions", headers={"Authorization": "token nope"})
    assert sorted(e["user"] for e in everyone) == ["alice", "bob"]
    assert [e["user"] for e in bobs] == ["bob"] and refused.status_code == 401
    lines = evictions_table(everyone).splitlines()
    assert "REASON" in lines[0] and "GPU-H FREED" in lines[0] and len(lines) == 3
    assert all(" idle " in line and "0.50" in line for line in lines[1:])
    assert evictions_table([]) == "No evictions."


async def test_replicas_take_turns(scheduler: Scheduler, gateway: NoticeGateway) -> None:
    first, second = (
        Evictor(scheduler, gateway, kernelspecs=KERNELSPECS, exclusive_s=5) for _ in range(2)
    )
    assert await first._my_turn() and not await second._my_turn()
