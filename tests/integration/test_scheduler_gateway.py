"""The real scheduler behind a real Enterprise Gateway (kernelfleet's gateway.server).

Leases follow the kernels through the gateway's activity reports (starting, idle, busy,
connections) and a kernel that dies frees its lease within 5 s; a start for a full pool
waits in the queue and gets in when room frees, or times out with a message saying where
it stood. Reconciliation runs against the same EG the whole time and must touch nothing.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.gateway_stack import (
    ALICE,
    CAROL,
    GATEWAY_PYTHON,
    GATEWAY_SERVICE,
    SCHEDULER_TOKEN,
    Gateway,
    HubAPIStandIn,
    channels,
    execute,
    send_execute,
    serve_stand_in,
    start_kernel,
)
from tests.support.ports import free_port
from tests.support.redis_server import running_redis
from tests.support.scheduler_stack import Stack

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not GATEWAY_PYTHON.exists(), reason="needs .venv-gateway")


@dataclass
class Platform:
    gateway: Gateway
    scheduler: Stack


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    folder = tmp_path_factory.mktemp("platform")
    hub, hub_port = serve_stand_in(HubAPIStandIn)
    scheduler_port = free_port()
    gateway = Gateway(folder / "gateway", hub_port, scheduler_port)
    with running_redis(folder / "redis") as redis:
        config = {
            "host": "127.0.0.1",
            "state_dir": "state",
            "kernelspecs_dir": str(REPO / "kernelspecs"),
            "ports": {"scheduler": scheduler_port, "redis": redis.port, "gateway": gateway.port,
                      "hub_api": hub_port},
            "pools": {
                "cpu": {"cpus": 8, "memory": "32Gi"},
                "gpu": {"cpus": 8, "memory": "32Gi", "gpus": 2, "simulated_gpus": True},
            },
            "quotas": {"default": {"kernels": 3}, "groups": {"ml": {"gpus": 1}}},
        }  # fmt: skip
        (folder / "kernelfleet.yaml").write_text(yaml.safe_dump(config))
        secrets = folder / "state" / "secrets"
        secrets.mkdir(parents=True)
        (secrets / "scheduler_token").write_text(SCHEDULER_TOKEN)
        (secrets / "gateway_service_token").write_text(GATEWAY_SERVICE)
        scheduler = Stack(folder=folder, redis=redis, port=scheduler_port)
        scheduler.start()
        try:
            yield Platform(gateway=gateway, scheduler=scheduler)
        finally:
            gateway.stop()  # first: it releases its kernels' leases as it stops them
            scheduler.stop()
            hub.shutdown()
            hub.server_close()
    log = scheduler.log()
    assert "reconciliation: released" not in log and "reconciliation: stopped" not in log, log


@pytest.fixture
async def clients(platform: Platform) -> AsyncIterator[Any]:
    made: list[httpx.AsyncClient] = []

    def make(token: str, url: str | None = None) -> httpx.AsyncClient:
        client = httpx.AsyncClient(base_url=url or platform.gateway.url, timeout=60,
                                   headers={"Authorization": f"token {token}"})  # fmt: skip
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


async def wait_for(check: Any, *, timeout_s: float = 10.0) -> float:
    """Poll ``check()`` (async) until true; the seconds it took."""
    began = time.monotonic()
    while not await check():
        assert time.monotonic() - began < timeout_s, "timed out"
        await asyncio.sleep(0.05)
    return time.monotonic() - began


async def test_the_lease_follows_the_kernel_and_a_death_frees_it_within_5_s(
    platform: Platform, clients: Any
) -> None:
    alice = clients(ALICE)
    scheduler = clients(SCHEDULER_TOKEN, platform.scheduler.url)
    kernel_id = await start_kernel(alice)

    async def lease() -> dict:
        return (await scheduler.get(f"/v1/leases/{kernel_id}")).json()

    assert (await lease())["state"] == "starting"  # until the kernel says anything
    session = uuid.uuid4().hex
    async with channels(platform.gateway, kernel_id, ALICE, session) as ws:
        assert (await execute(ws, "print('up')", session)).strip() == "up"
        await wait_for(lambda: _has(lease, state="idle", connections=1))
        await send_execute(ws, "import time; time.sleep(3)", session)
        await wait_for(lambda: _has(lease, state="busy"))
        assert (await execute(ws, "print('done')", session)).strip() == "done"
        await wait_for(lambda: _has(lease, state="idle"))
        await send_execute(ws, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)", session)
        gone_after = await wait_for(
            lambda: _answers(scheduler, f"/v1/leases/{kernel_id}", 404), timeout_s=10
        )
    assert gone_after <= 5.0, f"the lease outlived its kernel by {gone_after:.1f} s"
    stopped = (await scheduler.get("/v1/leases", params={"state": "stopped"})).json()["leases"]
    assert kernel_id in [x["kernel_id"] for x in stopped]


async def test_a_start_for_a_full_pool_waits_its_turn_or_times_out(
    platform: Platform, clients: Any
) -> None:
    alice, carol = clients(ALICE), clients(CAROL)
    scheduler = clients(SCHEDULER_TOKEN, platform.scheduler.url)
    first = await start_kernel(alice, "python-gpu")
    await start_kernel(carol, "python-gpu")  # both GPUs in use now
    waiting = asyncio.ensure_future(carol.post("/api/kernels", json={"name": "python-gpu"}))

    async def queued() -> int:
        queues = (await scheduler.get("/v1/queues")).json()["queues"]
        return sum(q["length"] for q in queues)

    await wait_for(lambda: _equal(queued, 1))
    late = await carol.post(
        "/api/kernels", json={"name": "python-gpu", "env": {"KERNEL_LAUNCH_TIMEOUT": "1"}}
    )
    assert late.status_code == 409
    assert late.json()["message"] == (
        "All 2 GPUs are in use; you were 2nd in line. Try again, or pick python-cpu."
    )
    assert not waiting.done()
    assert (await alice.delete(f"/api/kernels/{first}")).status_code == 204
    started = await asyncio.wait_for(waiting, 30)  # room: the head was admitted at once
    assert started.status_code == 201, started.text
    lease = (await scheduler.get(f"/v1/leases/{started.json()['id']}")).json()
    assert lease["user"] == "carol" and lease["waited"] > 0
    assert await queued() == 0


async def _has(read: Any, **expected: object) -> bool:
    found = await read()
    return all(found.get(k) == v for k, v in expected.items())


async def _answers(client: httpx.AsyncClient, path: str, status: int) -> bool:
    return (await client.get(path)).status_code == status


async def _equal(read: Any, value: object) -> bool:
    return await read() == value
