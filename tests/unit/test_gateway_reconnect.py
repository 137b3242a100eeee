"""gateway.server.reconnect: bounded stale closes, and no restoring from dead buffers."""

from __future__ import annotations

import asyncio

from gateway.server.reconnect import close_within, usable_buffer


class Stream:
    def __init__(self, closed: bool = False) -> None:
        self._closed = closed

    def closed(self) -> bool:
        return self._closed


def channels(**closed: bool) -> dict[str, Stream]:
    return {
        name: Stream(closed.get(name, False)) for name in ("iopub", "shell", "control", "stdin")
    }


def test_a_buffer_with_missing_or_closed_channels_is_not_usable() -> None:
    key = "k:s"
    assert usable_buffer({"session_key": key, "channels": channels()}, key)
    assert not usable_buffer({"session_key": key, "channels": {}}, key)  # the KeyError: 'iopub'
    assert not usable_buffer({"session_key": key, "channels": channels(iopub=True)}, key)
    # Another session's buffer: jupyter_server discards it itself.
    assert usable_buffer({"session_key": "k:other", "channels": {}}, key)


async def test_a_polite_close_that_finishes_is_not_forced() -> None:
    forced: list[bool] = []
    loop = asyncio.get_running_loop()

    def close() -> asyncio.Future[None]:
        future = loop.create_future()
        loop.call_later(0.01, future.set_result, None)
        return future

    assert not await close_within(close, lambda: forced.append(True), timeout_s=1)
    assert forced == []


async def test_a_close_that_hangs_is_forced_after_the_timeout() -> None:
    forced: list[bool] = []
    hanging = asyncio.get_running_loop().create_future()
    started = asyncio.get_running_loop().time()
    assert await close_within(lambda: hanging, lambda: forced.append(True), timeout_s=0.05)
    assert forced == [True] and asyncio.get_running_loop().time() - started < 1
    assert not hanging.cancelled()  # the handler's own close future must stay usable
