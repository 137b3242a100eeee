"""Users' usage against quota, GPU-hours in a rolling day, and who may read what."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from kernelfleet.config import PlatformConfig
from scheduler.admission import Admission
from scheduler.app import create_app
from scheduler.auth import HubTokenResolver
from scheduler.errors import QuotaExceeded
from scheduler.reconcile import Reconciler
from scheduler.service import Scheduler
from tests.support.scheduler_setup import KERNELSPECS, FakeGateway, ManualClock, admit

TOKEN = "usage-test-service-token"
HOUR = 3600
MakeScheduler = Callable[..., Scheduler]

PLATFORM = PlatformConfig.model_validate(
    {
        "pools": {
            "cpu": {"cpus": 8, "memory": "32Gi"},
            "gpu": {"cpus": 16, "memory": "64Gi", "gpus": 2, "simulated_gpus": True},
        },
        "quotas": {
            "default": {"kernels": 3, "gpu_hours_per_day": 0},
            "groups": {"ml": {"gpus": 1, "gpu_hours_per_day": 1}},
        },
        "users": {"carol": {"groups": ["ml"]}},
    }
)
HUB_USERS = {
    "alice-token": {"kind": "user", "name": "alice", "admin": False, "groups": ["ml"]},
    "ops-token": {"kind": "user", "name": "ops", "admin": True, "groups": []},
    "culler-token": {"kind": "service", "name": "idle-culler"},
}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def scheduler(make_scheduler: MakeScheduler, clock: ManualClock) -> Scheduler:
    return make_scheduler(PLATFORM, KERNELSPECS, clock=clock)


async def test_gpu_hours_in_a_rolling_day_are_enforced_at_admission(
    scheduler: Scheduler, clock: ManualClock
) -> None:
    start = clock.now
    first = await admit(scheduler, "alice", wait_s=0)
    assert isinstance(first, Admission)
    clock.advance(HOUR / 2)
    assert (await scheduler.usage.of_user("alice")).gpu_hours == 0.5
    clock.advance(HOUR / 2)
    await scheduler.release(first.lease.kernel_id)
    with pytest.raises(QuotaExceeded) as spent:
        await admit(scheduler, "alice", wait_s=0)
    assert spent.value.message == (
        "GPU-hour quota: you used 1 of 1 GPU-hours in the last 24 hours. "
        "Try again later, or pick python-cpu."
    )
    assert isinstance(await admit(scheduler, "alice", "python-cpu", wait_s=0), Admission)
    clock.now = start + HOUR + 24 * HOUR - HOUR / 2  # half of that hour left the window
    assert (await scheduler.usage.of_user("alice")).gpu_hours == 0.5
    assert isinstance(await admit(scheduler, "alice", wait_s=0), Admission)
    with pytest.raises(QuotaExceeded) as none:
        await admit(scheduler, "bob", groups=["team"], wait_s=0)  # default: no GPU time
    assert none.value.message == (
        "GPU-hour quota: your quota allows no GPU time. Pick a CPU kernel, or ask an admin."
    )


async def test_gpu_kernels_are_stopped_when_gpu_hours_run_out(
    scheduler: Scheduler, clock: ManualClock
) -> None:
    kernel = await admit(scheduler, "alice", wait_s=0)
    other = await admit(scheduler, "carol", wait_s=0)
    assert isinstance(kernel, Admission) and isinstance(other, Admission)
    gateway = FakeGateway({kernel.lease.kernel_id, other.lease.kernel_id})
    reconciler = Reconciler(scheduler, gateway)
    clock.advance(HOUR - 1)
    assert await reconciler.enforce_gpu_hours() == []
    gateway.down = True  # EG unreachable: nothing is released on a guess
    clock.advance(1)
    assert await reconciler.enforce_gpu_hours() == []
    assert await scheduler.leases.get(kernel.lease.kernel_id) is not None
    gateway.down = False
    stopped = await reconciler.enforce_gpu_hours()
    assert sorted(stopped) == sorted([kernel.lease.kernel_id, other.lease.kernel_id])
    assert sorted(gateway.stopped) == sorted(stopped)
    reasons = {x.stop_reason for x in await scheduler.leases.list(state="stopped")}
    assert reasons == {"gpu_hours_exhausted"}
    assert (
        'evictions_total{reason="gpu_hours_exhausted"} 2.0' in scheduler.metrics.render().decode()
    )


async def test_usage_against_quota(scheduler: Scheduler, clock: ManualClock) -> None:
    await admit(scheduler, "carol", wait_s=0)
    await admit(scheduler, "carol", "python-cpu", wait_s=0)
    clock.advance(HOUR / 4)
    usage = await scheduler.usage.of_user("carol")
    assert (usage.kernels, usage.cpus, usage.memory, usage.gpus, usage.gpu_hours) == (
        2,
        2,
        4 * 2**30,
        1,
        0.25,
    )
    assert (usage.groups, usage.quota.gpus, usage.quota.kernels) == (["ml"], 1, 3)
    never = await scheduler.usage.of_user("dana")  # never asked: groups from kernelfleet.yaml
    assert (never.groups, never.kernels, never.quota.gpu_hours_per_day) == ([], 0, 0)


# -- who may read what ---------------------------------------------------------------------


class HubStandIn:
    """JupyterHub's GET /hub/api/user for a fixed token table; counts calls; can be down."""

    def __init__(self) -> None:
        self.calls = 0
        self.down = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.down:
            raise httpx.ConnectError("refused", request=request)
        token = request.headers.get("Authorization", "").removeprefix("token ")
        if token not in HUB_USERS:
            return httpx.Response(403, json={"status": 403, "message": "Forbidden"})
        return httpx.Response(200, json=HUB_USERS[token])


@pytest.fixture
def hub() -> HubStandIn:
    return HubStandIn()


@pytest.fixture
async def as_user(scheduler: Scheduler, hub: HubStandIn) -> AsyncIterator[Callable]:
    resolver = HubTokenResolver("http://hub/hub/api", transport=httpx.MockTransport(hub))
    app = create_app(scheduler, token=TOKEN, resolver=resolver)
    clients = []

    def client(token: str) -> httpx.AsyncClient:
        made = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://s",
            headers={"Authorization": f"token {token}"},
        )
        clients.append(made)
        return made

    yield client
    for made in clients:
        await made.aclose()
    await resolver.aclose()


async def test_a_user_sees_only_their_own_usage_and_queue(
    scheduler: Scheduler, as_user: Callable, hub: HubStandIn
) -> None:
    await admit(scheduler, "alice", wait_s=0)
    alice = as_user("alice-token")
    mine = await alice.get("/v1/users/alice/usage")
    assert mine.status_code == 200
    assert mine.json()["groups"] == ["ml"] and mine.json()["quota"]["gpus"] == 1
    assert mine.json()["used"]["gpus"] == 1
    assert (await alice.get("/v1/users/alice/queue")).json() == {"user": "alice", "entries": []}
    for path in (
        "/v1/users/bob/usage",
        "/v1/users/bob/queue",
        "/v1/pools",
        "/v1/leases",
        "/v1/queues",
        "/v1/admissions/k1",
    ):
        answer = await alice.get(path)
        assert answer.status_code == 403 and answer.json()["error"] == "forbidden", path
    assert (await alice.delete("/v1/leases/k1")).status_code == 403
    body = {"kernel_id": "k1", "user": "alice", "groups": ["ml"], "kernelspec": "python-cpu"}
    assert (await alice.post("/v1/admissions", json=body)).status_code == 403
    assert hub.calls == 1  # resolved once, then cached


async def test_hub_admins_read_everything_but_change_nothing(as_user: Callable) -> None:
    ops = as_user("ops-token")
    for path in ("/v1/pools", "/v1/leases", "/v1/queues", "/v1/users/bob/usage"):
        assert (await ops.get(path)).status_code == 200, path
    assert (await ops.put("/v1/activity", json={"kernels": []})).status_code == 403


async def test_unknown_tokens_services_and_an_unreachable_hub(
    as_user: Callable, hub: HubStandIn
) -> None:
    for token in ("nobody", "culler-token"):
        answer = await as_user(token).get("/v1/users/alice/usage")
        assert answer.status_code == 401 and answer.json()["error"] == "unauthorized"
    hub.down = True
    down = await as_user("new-token").get("/v1/users/alice/usage")
    assert down.status_code == 503 and down.json() == {
        "error": "hub_unavailable",
        "message": "JupyterHub's API is unreachable, so the scheduler cannot verify your "
        "token. Try again in a minute.",
    }
    assert (await as_user(TOKEN).get("/v1/pools")).status_code == 200  # the service token
