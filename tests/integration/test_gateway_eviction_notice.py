"""Eviction notices through a real Enterprise Gateway: every connected client sees them."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest

from scheduler.errors import GatewayUnavailable
from scheduler.reconcile import EnterpriseGatewayClient
from tests.support import gateway_stack as served
from tests.support.gateway_stack import (
    ALICE,
    GATEWAY_PYTHON,
    GATEWAY_SERVICE,
    Gateway,
    channels,
    execute,
    send_execute,
    start_kernel,
)

# the gateway fixtures of tests/support/gateway_stack.py (one EG for this module)
hub_port, scheduler_port = served.hub_port, served.scheduler_port
gateway, api = served.gateway, served.api

pytestmark = pytest.mark.skipif(not GATEWAY_PYTHON.exists(), reason="needs .venv-gateway")


async def next_stderr_message(ws: Any, timeout: float = 10) -> dict[str, Any]:
    """The next IOPub stderr stream message on ``ws``."""
    async with asyncio.timeout(timeout):
        while True:
            msg = json.loads(await ws.recv())
            if msg.get("channel") == "iopub" and msg["header"]["msg_type"] == "stream":
                if msg["content"]["name"] == "stderr":
                    return msg


async def next_stderr(ws: Any, timeout: float = 10) -> str:
    """The text of the next IOPub stderr stream message on ``ws``."""
    return str((await next_stderr_message(ws, timeout))["content"]["text"])


async def test_notice_reaches_every_connected_client(gateway: Gateway, api: Any) -> None:
    kernel_id = await start_kernel(api(ALICE))
    eg = EnterpriseGatewayClient(gateway.url, GATEWAY_SERVICE)
    sessions = [uuid.uuid4().hex for _ in range(2)]
    tabs = [await channels(gateway, kernel_id, ALICE, s) for s in sessions]
    try:
        ran = await send_execute(tabs[0], "print(1)", sessions[0])
        assert (await execute(tabs[0], "print(2)", sessions[0])).strip() == "2"
        text = "This GPU kernel has been idle for 25 minutes. Run any cell to keep it."
        assert await eg.notice(kernel_id, text) == 2
        got = [await next_stderr_message(tab) for tab in tabs]
        assert [m["content"]["text"].strip() for m in got] == [text, text]
        # under the cell that tab ran last (JupyterLab shows it there); the other ran none
        assert got[0]["parent_header"]["msg_id"] not in ("", ran)
        assert got[0]["parent_header"]["msg_type"] == "execute_request"
        assert not got[1]["parent_header"]
        refused = await api(ALICE).post(
            f"/kernelfleet/kernels/{kernel_id}/notice", json={"text": "fake eviction"}
        )
        assert refused.status_code == 403  # only the scheduler (an admin identity) speaks here
    finally:
        for tab in tabs:
            await tab.close()
        await eg.aclose()


async def test_notice_waits_for_the_first_client(gateway: Gateway, api: Any) -> None:
    kernel_id = await start_kernel(api(ALICE))
    eg = EnterpriseGatewayClient(gateway.url, GATEWAY_SERVICE)
    try:
        note = "Your python-cpu kernel was stopped at 14:02 after 30 min idle."
        assert await eg.notice(kernel_id, note) == 0
        async with channels(gateway, kernel_id, ALICE, uuid.uuid4().hex) as tab:
            assert (await next_stderr(tab)).strip() == note
        with pytest.raises(GatewayUnavailable):
            await eg.notice(kernel_id, "")  # 400: nothing to say
    finally:
        await eg.aclose()
