"""Pure helpers for fast, correct channel reconnects with the same session id.

jupyter_server 1.24 replaces a stale connection by awaiting its close handshake with no
limit (seen taking ~48 s when the stale one is stuck opening), and restores a new connection
from a message buffer even when that buffer's channels are missing or closed (``KeyError:
'iopub'``). These helpers bound the first and detect the second (DESIGN.md, known pitfalls).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

CHANNELS = ("iopub", "shell", "control", "stdin")


def usable_buffer(buffer_info: Mapping[str, Any], session_key: str) -> bool:
    """False when a buffer kept for ``session_key`` cannot be restored from.

    A buffer for another session is "usable" here: jupyter_server discards it itself.
    """
    if buffer_info.get("session_key") != session_key:
        return True
    channels = buffer_info.get("channels") or {}
    for name in CHANNELS:
        stream = channels.get(name)
        if stream is None or stream.closed():
            return False
    return True


async def close_within(
    close: Callable[[], Awaitable[Any] | None],
    force: Callable[[], None],
    *,
    timeout_s: float,
) -> bool:
    """Start a polite close; if it has not finished after ``timeout_s``, ``force`` it.

    Returns True when it had to force. The polite close is never cancelled (cancelling
    jupyter_server's close future would break the handler's own ``on_close`` later).
    """
    closing = close()
    if closing is None:
        return False
    done, _ = await asyncio.wait({asyncio.ensure_future(closing)}, timeout=timeout_s)
    if done:
        return False
    force()
    return True
