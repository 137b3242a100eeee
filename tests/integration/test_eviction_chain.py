"""Idle eviction through the real chain: scheduler process → Enterprise Gateway → websocket.

The scheduler's kernelspecs give python-cpu a 4 s idle timeout with a 2 s warning and
``evict_connected_idle`` (as python-gpu has in production), and it sweeps every 0.2 s;
pressure evicts a kernel idle for 1 s after a 1 s warning.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.eg_chain import kernelspecs_with, scheduler_and_gateway
from tests.support.gateway_stack import (
    ALICE,
    CAROL,
    GATEWAY_PYTHON,
    SCHEDULER_TOKEN,
    Gateway,
    channels,
    execute,
    start_kernel,
)
from tests.support.scheduler_stack import Stack

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not GATEWAY_PYTHON.exists(), reason="needs .venv-gateway")


def _short_idle(name: str, spec: dict[str, Any]) -> None:
    spec["warm_target"] = 0  # these tests start their kernels cold
    if name == "python-cpu":
        spec.update(idle_timeout="4s", warning_before="2s", evict_connected_idle=True)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Stack]]:
    folder = tmp_path_factory.mktemp("chain")
    args = ["--eviction-interval", "0.2", "--pressure-grace", "1", "--pressure-warning", "1"]
    with scheduler_and_gateway(folder, kernelspecs_with(folder, _short_idle),
                               scheduler_args=args) as running:  # fmt: skip
        yield running


@pytest.fixture
async def api(chain: tuple[Gateway, Stack]) -> AsyncIterator[tuple[httpx.AsyncClient, ...]]:
    gateway, scheduler = chain
    async with (
        httpx.AsyncClient(base_url=gateway.url, timeout=60,
                          headers={"Authorization": f"token {ALICE}"}) as alice,
        httpx.AsyncClient(base_url=scheduler.url, timeout=10,
                          headers={"Authorization": f"token {SCHEDULER_TOKEN}"}) as ops,
    ):  # fmt: skip
        yield alice, ops


async def stderr_lines(ws: Any, timeout: float) -> str:
    """The next IOPub stderr stream text on ``ws``."""
    async with asyncio.timeout(timeout):
        while True:
            msg = json.loads(await ws.recv())
            if msg["header"]["msg_type"] == "stream" and msg["content"]["name"] == "stderr":
                return msg["content"]["text"]


async def test_idle_kernel_is_warned_evicted_recorded_and_mentioned_once(
    chain: tuple[Gateway, Stack], api: tuple[httpx.AsyncClient, ...]
) -> None:
    gateway, _ = chain
    alice, ops = api
    kernel_id = await start_kernel(alice)
    session = uuid.uuid4().hex
    async with channels(gateway, kernel_id, ALICE, session) as ws:
        assert (await execute(ws, "print('hi')", session)).strip() == "hi"
        warning = await stderr_lines(ws, timeout=10)  # the tab stays open, silent
        assert "has been idle for" in warning and "Run any cell to keep it." in warning
        async with asyncio.timeout(10):
            while (await ops.get(f"/v1/leases/{kernel_id}")).status_code != 404:
                await asyncio.sleep(0.1)
    assert (await alice.get(f"/api/kernels/{kernel_id}")).status_code == 404
    [record] = (await ops.get("/v1/evictions", params={"user": "alice"})).json()["evictions"]
    assert (record["kernel_id"], record["reason"]) == (kernel_id, "idle")
    stopped = (await ops.get("/v1/leases", params={"state": "stopped"})).json()["leases"]
    assert [x["stop_reason"] for x in stopped if x["kernel_id"] == kernel_id] == ["idle"]

    again = await start_kernel(alice)  # the next start mentions it, once
    async with channels(gateway, again, ALICE, uuid.uuid4().hex) as ws:
        note = await stderr_lines(ws, timeout=10)
    assert note.startswith("Your python-cpu kernel was stopped at ") and "min idle" in note
    await alice.delete(f"/api/kernels/{again}")


async def test_running_a_cell_after_the_warning_cancels_the_eviction(
    chain: tuple[Gateway, Stack], api: tuple[httpx.AsyncClient, ...]
) -> None:
    gateway, _ = chain
    alice, ops = api
    kernel_id = await start_kernel(alice)
    session = uuid.uuid4().hex
    async with channels(gateway, kernel_id, ALICE, session) as ws:
        await execute(ws, "print('hi')", session)
        await stderr_lines(ws, timeout=10)
        assert (await execute(ws, "print('still here')", session)).strip() == "still here"
        await asyncio.sleep(2.5)  # past the warned deadline
        assert (await ops.get(f"/v1/leases/{kernel_id}")).status_code == 200
        await execute(ws, "print('keep')", session)
    await alice.delete(f"/api/kernels/{kernel_id}")


async def test_pressure_frees_a_gpu_for_a_queued_user(
    chain: tuple[Gateway, Stack], api: tuple[httpx.AsyncClient, ...]
) -> None:
    gateway, scheduler = chain
    alice, ops = api
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60,
                                 headers={"Authorization": f"token {CAROL}"}) as carol:  # fmt: skip
        held = []
        for client, token in ((alice, ALICE), (carol, CAROL)):
            # one after the other: alice's last activity is older than carol's kernel even
            # while carol's activity report is still on its way (reports go every 1 s)
            kernel_id = await start_kernel(client, "python-gpu")
            session = uuid.uuid4().hex
            async with channels(gateway, kernel_id, token, session) as ws:
                await execute(ws, "print('on a GPU')", session)  # then idle, tab closed
            held.append(kernel_id)
        # Pressure picks among leases reported idle: wait for both reports (1 s apart under
        # load they may come after the queued request, and then only carol's would count).
        async with asyncio.timeout(30):
            while {(await ops.get(f"/v1/leases/{k}")).json()["state"] for k in held} != {"idle"}:
                await asyncio.sleep(0.1)
        waiting = await carol.post("/api/kernels", json={"name": "python-gpu"})
        assert waiting.status_code == 201, waiting.text  # queued, then admitted
        found = (await ops.get("/v1/evictions", params={"limit": 10})).json()["evictions"]
        assert [(e["kernel_id"], e["reason"]) for e in found if e["reason"] == "pressure"] == [
            (held[0], "pressure")  # alice's, idle the longest
        ]
        assert (await ops.get(f"/v1/leases/{held[1]}")).status_code == 200
        for kernel_id in (held[1], waiting.json()["id"]):
            await carol.delete(f"/api/kernels/{kernel_id}")
