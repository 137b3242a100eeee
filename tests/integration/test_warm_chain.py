"""Warm pools through the real chain: scheduler process → Enterprise Gateway → kernels.

python-cpu's spec.yaml asks for 2 warm kernels; the gateway refills every 0.3 s. Users
start kernels over EG's REST API and run code over its websocket, as the notebook server
does; the scheduler's API shows who holds each lease. carol may hold one kernel.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.support.eg_chain import kernelspecs_with, scheduler_and_gateway
from tests.support.gateway_stack import (
    ALICE,
    BOB,
    CAROL,
    GATEWAY_PYTHON,
    GATEWAY_SERVICE,
    SCHEDULER_TOKEN,
    Gateway,
    channels,
    execute,
    start_kernel,
)
from tests.support.scheduler_stack import Stack

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not GATEWAY_PYTHON.exists(), reason="needs .venv-gateway")
TARGET = 2
WHO_AM_I = (
    "import os; print(os.environ.get('KERNEL_USERNAME'), os.environ.get('HOME'), os.getcwd(),"
    " os.environ.get('KERNEL_WARM'), os.environ.get('KERNEL_TEAM'), sep='|')"
)


def _warm(name: str, spec: dict[str, Any]) -> None:
    spec["warm_target"] = TARGET if name == "python-cpu" else 0


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Stack]]:
    folder = tmp_path_factory.mktemp("warm")
    config = (
        "c.KernelfleetMappingKernelManager.warm_interval = 0.3\n"
        "c.KernelfleetMappingKernelManager.warm_claim_timeout = 2.0\n"
    )
    quotas = {"quotas": {"users": {"carol": {"kernels": 1}}}}
    with scheduler_and_gateway(folder, kernelspecs_with(folder, _warm), gateway_config=config,
                               platform=quotas) as running:  # fmt: skip
        yield running


@pytest.fixture
async def api(chain: tuple[Gateway, Stack]) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    gateway, scheduler = chain

    def client(url: str, token: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=url, timeout=60,
                                 headers={"Authorization": f"token {token}"})  # fmt: skip

    async with (
        client(gateway.url, ALICE) as alice, client(gateway.url, BOB) as bob,
        client(gateway.url, CAROL) as carol, client(gateway.url, GATEWAY_SERVICE) as service,
        client(scheduler.url, SCHEDULER_TOKEN) as ops,
    ):  # fmt: skip
        yield {"alice": alice, "bob": bob, "carol": carol, "service": service, "ops": ops}


async def warm_ids(api: dict[str, httpx.AsyncClient]) -> set[str]:
    """The ready warm kernels, as the scheduler's reconciliation sees them."""
    listed = (await api["service"].get("/api/kernels", params={"include": "warm"})).json()
    return {k["id"] for k in listed if k.get("warm")}


async def full(api: dict[str, httpx.AsyncClient], timeout: float = 60) -> set[str]:
    """Wait until the pool holds its target of ready kernels (scheduler and EG agree, and
    EG's activity reports made their leases idle)."""
    async with asyncio.timeout(timeout):
        while True:
            pools = (await api["ops"].get("/v1/warm-pools")).json()["warm_pools"]
            ready = next(p["ready"] for p in pools if p["kernelspec"] == "python-cpu")
            leases = (await api["ops"].get("/v1/leases", params={"user": "@warm"})).json()
            idle = {lease["kernel_id"] for lease in leases["leases"] if lease["state"] == "idle"}
            ids = await warm_ids(api)
            if ready == TARGET and len(ids) == TARGET and idle == ids:
                return ids
            await asyncio.sleep(0.2)


async def who_is(gateway: Gateway, kernel_id: str, token: str) -> list[str]:
    session = uuid.uuid4().hex
    async with channels(gateway, kernel_id, token, session) as ws:
        return (await execute(ws, WHO_AM_I, session)).strip().split("|")


async def test_the_pool_fills_and_its_kernels_are_nobodys(
    chain: tuple[Gateway, Stack], api: dict[str, httpx.AsyncClient]
) -> None:
    gateway, _ = chain
    warm = await full(api)
    for user in ("alice", "carol"):  # carol is an admin: she does not see them either
        assert (await api[user].get("/api/kernels")).json() == []
    some = next(iter(warm))
    assert (await api["carol"].get(f"/api/kernels/{some}")).status_code == 404
    assert (await api["carol"].delete(f"/api/kernels/{some}")).status_code == 404
    leases = (await api["ops"].get("/v1/leases", params={"kernelspec": "python-cpu"})).json()
    assert {lease["kernel_id"] for lease in leases["leases"]} == warm
    assert {lease["user"] for lease in leases["leases"]} == {"@warm"}
    alice_usage = (await api["ops"].get("/v1/users/alice/usage")).json()["used"]
    assert alice_usage["kernels"] == 0
    # Their ports are below the ephemeral range, which outgoing connections draw from.
    ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for process in (p for p in psutil.process_iter() if _kernel_id(p) in warm):
        connection = json.loads(Path(process.cmdline()[-1]).read_text())
        assert all(connection[f"{c}_port"] < ephemeral
                   for c in ("shell", "iopub", "stdin", "control", "hb")), connection  # fmt: skip


async def test_a_claim_hands_over_a_personalised_kernel_and_the_pool_refills(
    chain: tuple[Gateway, Stack], api: dict[str, httpx.AsyncClient]
) -> None:
    gateway, _ = chain
    warm = await full(api)
    alices = await start_kernel(api["alice"], "python-cpu", KERNEL_TEAM="analytics")
    assert alices in warm  # claimed, not cold-started
    home = str(gateway.home / "alice")
    assert await who_is(gateway, alices, ALICE) == ["alice", home, home, "None", "analytics"]
    session = uuid.uuid4().hex
    async with channels(gateway, alices, ALICE, session) as ws:
        # the setup ran silently: not in the history, nothing left in the namespace
        code = "print(any('__kf_os' in c for c in In), '__kf_os' in dir())"
        assert (await execute(ws, code, session)).split() == ["False", "False"]
    lease = (await api["ops"].get(f"/v1/leases/{alices}")).json()
    assert lease["user"] == "alice"
    assert [k["id"] for k in (await api["alice"].get("/api/kernels")).json()] == [alices]

    ready = await warm_ids(api)  # one left, perhaps one refilled already
    bobs = await start_kernel(api["bob"], "python-cpu")
    assert bobs in ready and bobs != alices  # the next claim gets another warm kernel
    bob_home = str(gateway.home / "bob")
    assert (await who_is(gateway, bobs, BOB))[:3] == ["bob", bob_home, bob_home]
    assert (await api["alice"].get(f"/api/kernels/{bobs}")).status_code == 404

    refilled = await full(api)
    assert not refilled & {alices, bobs}  # a warm kernel serves one user, once
    for kernel_id, client in ((alices, api["alice"]), (bobs, api["bob"])):
        assert (await client.delete(f"/api/kernels/{kernel_id}")).status_code == 204


async def test_a_refused_claim_gives_the_user_nothing_and_retries_do_not_drain_the_pool(
    api: dict[str, httpx.AsyncClient],
) -> None:
    await full(api)
    carols = await start_kernel(api["carol"], "python-cpu")  # her one kernel: a claim
    try:
        warm = await full(api)
        refused = await api["carol"].post("/api/kernels", json={"name": "python-cpu"})
        assert refused.status_code == 403
        assert "kernel" in refused.json()["message"]
        # The kernel that claim tried was personalised while the scheduler decided: stopped.
        async with asyncio.timeout(10):
            while len(warm - await warm_ids(api)) != 1:
                await asyncio.sleep(0.1)
        gone = warm - await warm_ids(api)
        assert [p for p in psutil.process_iter() if _kernel_id(p) in gone] == []
        warm = await full(api)
        for _ in range(3):  # retries ask the scheduler first: the pool keeps its kernels
            again = await api["carol"].post("/api/kernels", json={"name": "python-cpu"})
            assert again.status_code == 403
        assert await warm_ids(api) == warm
        leases = (await api["ops"].get("/v1/leases", params={"user": "carol"})).json()
        assert [lease["kernel_id"] for lease in leases["leases"]] == [carols]
    finally:
        assert (await api["carol"].delete(f"/api/kernels/{carols}")).status_code == 204


async def test_a_lower_target_stops_warm_kernels_and_frees_their_room(
    api: dict[str, httpx.AsyncClient],
) -> None:
    warm = await full(api)
    pinned = await api["ops"].put("/v1/warm-pools/python-cpu", json={"target": 0})
    assert pinned.status_code == 200
    try:
        async with asyncio.timeout(30):
            while await warm_ids(api) or (await pool_used(api))["kernels"]:
                await asyncio.sleep(0.2)
        processes = [p for p in psutil.process_iter() if _kernel_id(p) in warm]
        assert processes == []  # stopped, not just forgotten
    finally:
        await api["ops"].delete("/v1/warm-pools/python-cpu")
    assert not (await full(api)) & warm  # back to the spec's target, with new kernels


async def pool_used(api: dict[str, httpx.AsyncClient]) -> dict[str, float]:
    pools = (await api["ops"].get("/v1/pools")).json()["pools"]
    return next({**p["used"], "kernels": p["kernels"]} for p in pools if p["name"] == "cpu")


async def test_a_kernel_that_cannot_be_personalised_is_discarded_for_a_cold_start(
    chain: tuple[Gateway, Stack], api: dict[str, httpx.AsyncClient]
) -> None:
    gateway, _ = chain
    warm = await full(api)
    hung = [p for p in psutil.process_iter() if _kernel_id(p) in warm]
    assert len(hung) == TARGET
    for process in hung:  # every warm kernel stops answering
        os.kill(process.pid, signal.SIGSTOP)
    try:
        kernel_id = await start_kernel(api["alice"], "python-cpu")
        assert kernel_id not in warm  # started cold after the claim timed out
        home = str(gateway.home / "alice")
        assert (await who_is(gateway, kernel_id, ALICE))[:3] == ["alice", home, home]
        async with asyncio.timeout(10):  # the one it tried is stopped and its lease released
            while True:
                leases = (await api["ops"].get("/v1/leases")).json()["leases"]
                live = {lease["kernel_id"] for lease in leases}
                if len(warm - live) == 1:
                    break
                await asyncio.sleep(0.2)
        assert (await api["alice"].delete(f"/api/kernels/{kernel_id}")).status_code == 204
    finally:
        for process in hung:
            try:
                os.kill(process.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def _kernel_id(process: psutil.Process) -> str:
    try:
        return process.environ().get("KERNEL_ID", "")
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return ""
