"""Channel openings confirmed by the kernel's iopub welcome (gateway/server/welcome.py).

Against a real ipykernel started by jupyter_client: the probe learns that it welcomes new
subscriptions even while another client (as EG's activity watch does) already subscribes to
everything; a welcome nudge confirms a new iopub stream without sending the kernel a single
request. Against a bare ZMQ publisher that never welcomes (as kernels before ipykernel 7 do),
the probe says no and the nudge falls back to the stock one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from jupyter_client.manager import AsyncKernelManager
from zmq.eventloop.zmqstream import ZMQStream

from gateway.server.activity_watch import LightActivityWatchMixin
from gateway.server.welcome import WELCOMES, is_welcome, probe, welcome_nudge, welcomes


@pytest.fixture
async def kernel(tmp_path: Path) -> AsyncIterator[AsyncKernelManager]:
    """A real ipykernel, with one client subscribed to all of its iopub (like EG's watch)."""
    km = AsyncKernelManager(kernel_name="python3", connection_file=str(tmp_path / "k.json"))
    await km.start_kernel()
    client = km.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=60)
        yield km
    finally:
        client.stop_channels()
        await km.shutdown_kernel(now=True)


class Silent:
    """A publisher that never welcomes anyone: what a kernel without JEP 65 looks like."""

    def __init__(self) -> None:
        self.socket = zmq.Context.instance().socket(zmq.PUB)
        self.port = self.socket.bind_to_random_port("tcp://127.0.0.1")

    def _make_url(self, channel: str) -> str:
        return f"tcp://127.0.0.1:{self.port}"


def iopub_stream(km: Any) -> ZMQStream:
    """A subscription to everything on ``km``'s iopub, as jupyter_server's channels open it."""
    socket = zmq.Context.instance().socket(zmq.SUB)
    socket.linger = 0
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.connect(km._make_url("iopub"))
    return ZMQStream(socket)


async def run(km: AsyncKernelManager, code: str) -> None:
    """Execute ``code`` on ``km``'s kernel from a client of its own; its output has been
    published once this returns."""
    client = km.client()
    client.start_channels()
    try:
        await client.execute(code, reply=True, timeout=30)
    finally:
        client.stop_channels()
    await asyncio.sleep(0.2)


async def test_a_real_kernel_welcomes_a_subscription_even_when_everything_is_subscribed(
    kernel: AsyncKernelManager,
) -> None:
    assert not welcomes(kernel)  # not known until probed
    assert await probe(kernel) is True
    assert welcomes(kernel) and getattr(kernel, WELCOMES) is True


async def test_a_publisher_without_welcomes_is_found_out_within_the_timeout() -> None:
    silent = Silent()
    try:
        began = time.monotonic()
        assert await probe(silent, timeout_s=0.3) is False
        assert 0.3 <= time.monotonic() - began < 2
        assert not welcomes(silent)
    finally:
        silent.socket.close(0)


async def test_a_welcome_confirms_a_connection_without_any_request_to_the_kernel(
    kernel: AsyncKernelManager,
) -> None:
    watch, stream = iopub_stream(kernel), iopub_stream(kernel)
    seen: list[list[bytes]] = []
    watch.on_recv(seen.append)
    await asyncio.sleep(0.3)  # the watch is live; drop whatever it got so far
    seen.clear()

    async def fallback() -> None:
        raise AssertionError("the stock nudge ran")

    try:
        began = time.monotonic()
        await welcome_nudge(stream, fallback=fallback, timeout_s=5, kernel_id="k")
        assert time.monotonic() - began < 1
        await asyncio.sleep(0.2)
        # A kernel_info nudge would have made the kernel publish busy/idle to everyone; all
        # that others see is the welcome, which they can tell apart and drop.
        assert seen and all(is_welcome(msg) for msg in seen)
        # The connection still gets everything afterwards (its "" subscription is intact).
        got: list[list[bytes]] = []
        stream.on_recv(got.append)
        await run(kernel, "print('hello')")
        assert any(b"hello" in part for msg in got for part in msg)
    finally:
        watch.close()
        stream.close()


async def test_without_a_welcome_the_stock_nudge_runs() -> None:
    silent = Silent()
    stream = iopub_stream(silent)
    ran: list[float] = []

    async def fallback() -> None:
        ran.append(time.monotonic())

    try:
        began = time.monotonic()
        await welcome_nudge(stream, fallback=fallback, timeout_s=0.3, kernel_id="k")
        assert len(ran) == 1 and ran[0] - began >= 0.3
    finally:
        stream.close()
        silent.socket.close(0)


async def test_a_welcome_is_not_kernel_activity(kernel: AsyncKernelManager) -> None:
    """A tab (re)connecting must not keep an idle kernel from its eviction."""

    class Watched:
        session = kernel.session

        def connect_iopub(self) -> ZMQStream:
            return iopub_stream(kernel)

    watch, watched = LightActivityWatchMixin(), Watched()
    watch._kernels = {"k": watched}
    watch.start_watching_activity("k")
    try:
        await asyncio.sleep(0.3)
        before = watched.last_activity  # type: ignore[attr-defined]
        assert await probe(kernel)  # the welcome reaches every subscription to ""
        await asyncio.sleep(0.2)
        assert watched.last_activity == before  # type: ignore[attr-defined]
        await run(kernel, "1 + 1")
        assert watched.last_activity > before  # type: ignore[attr-defined]
        assert watched.execution_state == "idle"  # type: ignore[attr-defined]
    finally:
        watched._activity_stream.close()  # type: ignore[attr-defined]


async def test_a_connection_closed_while_it_waits_ends_its_nudge_quietly() -> None:
    silent = Silent()
    stream = iopub_stream(silent)
    ran: list[bool] = []

    async def fallback() -> None:
        ran.append(True)

    try:
        nudge = welcome_nudge(stream, fallback=fallback, timeout_s=0.3, kernel_id="k")
        await asyncio.sleep(0.05)
        stream.close()  # the browser went away: jupyter_server closes the streams
        await nudge  # no error from the closed stream
        assert ran == [True]  # the stock nudge then sees the closed connection itself
    finally:
        silent.socket.close(0)


async def test_a_kernel_not_yet_known_to_be_up_is_nudged_after_its_welcome(
    kernel: AsyncKernelManager,
) -> None:
    """The activity watch learns a kernel's state from its status messages; a welcome is
    none, so a kernel still "starting" for EG gets the stock nudge's kernel_info too."""
    stream = iopub_stream(kernel)
    ran: list[bool] = []

    async def fallback() -> None:
        ran.append(True)

    try:
        await welcome_nudge(stream, fallback=fallback, timeout_s=5, kernel_id="k",
                            still_starting=lambda: True)  # fmt: skip
        assert ran == [True]
        ran.clear()
        await welcome_nudge(stream, fallback=fallback, timeout_s=5, kernel_id="k",
                            still_starting=lambda: False)  # fmt: skip
        assert ran == []
    finally:
        stream.close()
