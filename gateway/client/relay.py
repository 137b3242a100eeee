"""Byte relay between the browser's and the gateway's kernel websockets.

Once both handshakes are done, the two websockets carry the same frames: the gateway chose
the subprotocol and the browser got the same answer, and neither side negotiated an
extension. A frame from the browser is masked, as a frame to the gateway must be; a frame
from the gateway is unmasked, as a frame to the browser must be. So the notebook server
need not parse, unmask, re-mask and re-frame each message (tornado does that in Python,
with a coroutine step per frame header and payload): it can copy bytes from one socket to
the other as they arrive. Close and ping frames pass through too, so the close handshake
and the gateway's keep-alive pings are end to end. What this process must not do any more
is write frames of its own on either socket (they could land inside a relayed frame): no
pings of its own, and it closes a side by closing its TCP connection.

:class:`HeldProtocol` is the gateway side's websocket protocol: tornado starts its frame
loop as soon as the gateway's handshake is done, before the browser's is answered. It
waits instead until it is told either to relay to the browser's stream or to read frames
as usual (:meth:`HeldProtocol.hand_over`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from tornado import httpclient, httputil
from tornado.iostream import IOStream, StreamClosedError
from tornado.websocket import WebSocketClientConnection, WebSocketProtocol13

#: The most bytes one read passes on (a kernel message is usually far smaller).
CHUNK = 1 << 16


async def pump(
    source: IOStream, target: IOStream, *, after_read: Callable[[], None] | None = None
) -> None:
    """Copy bytes from ``source`` to ``target`` until either closes.

    Waits for ``target`` to take each chunk before reading the next, so a slow reader on
    one side holds the other side back (TCP's own flow control) instead of piling bytes up
    in this process.
    """
    try:
        while True:
            data = await source.read_bytes(CHUNK, partial=True)
            if after_read is not None:
                after_read()
            await target.write(data)
    except StreamClosedError:
        return


def stop_pings(protocol: WebSocketProtocol13) -> None:
    """Stop the pings tornado sends on ``protocol`` by itself (``ping_interval``)."""
    if protocol._ping_coroutine is not None:
        protocol._ping_coroutine.cancel()
        protocol._ping_coroutine = None


class HeldProtocol(WebSocketProtocol13):
    """The gateway side's protocol: its frame loop waits for :meth:`hand_over`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handover: asyncio.Future[tuple[IOStream, Callable[[], None] | None] | None] = (
            asyncio.get_running_loop().create_future()
        )
        self.relaying = False

    def hand_over(self, target: IOStream | None = None, *,
                  after_read: Callable[[], None] | None = None) -> None:  # fmt: skip
        """Relay what the gateway sends to ``target`` as bytes; None: read frames (the
        stock way: each message to the connection's callback). Only the first call counts."""
        if self._handover.done():
            return
        if target is not None:
            self.relaying = True  # from now on this process writes no frame of its own
            stop_pings(self)
        self._handover.set_result(None if target is None else (target, after_read))

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """While relaying, a close frame of ours could land inside a relayed frame: close
        the TCP connection instead (the browser then sees an abnormal close)."""
        if not self.relaying:
            super().close(code, reason)
            return
        self.server_terminated = True
        self.stream.close()

    def write_ping(self, data: bytes) -> None:
        if not self.relaying:
            super().write_ping(data)

    async def _receive_frame_loop(self) -> None:
        decided = await self._handover
        if decided is None:
            await super()._receive_frame_loop()
            return
        target, after_read = decided
        try:
            await pump(self.stream, target, after_read=after_read)
        finally:
            # The gateway closed (its close frame, if any, went to the browser) or the
            # browser side did: either way this websocket is over.
            self.client_terminated = self.server_terminated = True
            self.stream.close()
            self.handler.on_ws_connection_close(None, None)


class HeldConnection(WebSocketClientConnection):
    """tornado's websocket client with a :class:`HeldProtocol`."""

    protocol: HeldProtocol | None

    def get_websocket_protocol(self) -> HeldProtocol:
        return HeldProtocol(self, mask_outgoing=True, params=self.params)


async def connect_held(
    request: httpclient.HTTPRequest,
    *,
    on_message_callback: Callable[[str | bytes | None], None],
    subprotocols: list[str] | None,
    ping_interval: float | None,
) -> HeldConnection:
    """``tornado.websocket.websocket_connect`` for a :class:`HeldConnection`."""
    request.headers = httputil.HTTPHeaders(request.headers)
    # the defaults websocket_connect fills in (timeouts, certificate checks)
    request = cast(
        httpclient.HTTPRequest,
        httpclient._RequestProxy(request, httpclient.HTTPRequest._DEFAULTS),
    )
    connection = HeldConnection(
        request,
        on_message_callback=on_message_callback,
        subprotocols=subprotocols,
        ping_interval=ping_interval,
    )
    return cast(HeldConnection, await connection.connect_future)
