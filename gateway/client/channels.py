"""The kernel websocket proxy: browser <-> notebook server <-> gateway.

Why not jupyter-server's ``GatewayWebSocketConnection`` (see DESIGN.md, Known pitfalls):

- It forces the legacy protocol towards the browser (``kernel_ws_protocol = ""``) and opens
  the gateway websocket only once the browser's handshake is done. JupyterLab offers the
  ``v1.kernel.websocket.jupyter.org`` subprotocol; a 101 answer without
  ``Sec-WebSocket-Protocol`` makes Chromium fail the handshake ("Sent non-empty
  'Sec-WebSocket-Protocol' header but no response was received") *after* the server ran
  ``open()`` and connected to the gateway. JupyterLab retries at once with the same session
  id, so the gateway gets a second channels websocket for the same ``kernel:session`` while
  the first is still open: EG "replaces the stale connection", the second handshake stalls
  ~48 s, the buffer restore fails with ``KeyError: 'iopub'``, and the notebook shows an
  "Unknown" kernel with cells stuck at ``[*]``.
- It leaves Nagle on after the upgrade on both hops (~40 ms a message), and on a lost
  gateway websocket it retries behind the browser's back instead of telling it.

`GatewayChannelsConnection` opens the gateway websocket *before* the browser's handshake
is answered, offering the gateway the subprotocols the browser offered, and answers the
browser with the one the gateway chose. Frames then pass through untouched both ways (no
re-serialization), the browser's first handshake succeeds, and at most one gateway
websocket per ``kernel:session`` is open at a time: a reconnect waits until the previous
one has closed. When the gateway closes, the browser's websocket is closed too, and
JupyterLab's own reconnect logic takes over.

Once both handshakes are done, the frames are not even parsed: bytes are copied between
the two sockets as they arrive (:mod:`.relay`, ``relay_bytes``), unless the server was
configured to compress websockets.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, ClassVar
from urllib.parse import quote

from jupyter_server.gateway.gateway_client import GatewayClient
from jupyter_server.services.kernels.connection.base import BaseKernelWebsocketConnection
from jupyter_server.utils import url_path_join
from tornado import web
from tornado.escape import url_escape
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError
from traitlets import Bool, Float, Unicode

from .errors import refusal_from
from .relay import HeldConnection, connect_held, pump, stop_pings
from .tcp import ack_now, set_nodelay, stream_socket

Message = str | bytes
#: Tells the gateway which notebook a channels websocket serves (for its audit trail).
PATH_HEADER = "X-Kernelfleet-Notebook-Path"


def offered_subprotocols(request_headers: Any) -> list[str]:
    """The subprotocols a websocket client offered, in its order of preference."""
    header = request_headers.get("Sec-WebSocket-Protocol", "") or ""
    return [name.strip() for name in header.split(",") if name.strip()]


def subprotocols_to_offer(preference: str | None, offered: list[str]) -> list[str]:
    """What to offer the gateway, given the configured ``preference`` and the browser's offer.

    ``None`` passes the browser's offer on; ``""`` offers nothing (legacy protocol); a name
    is offered only if the browser offered it too.
    """
    if preference is None:
        return list(offered)
    if preference == "":
        return []
    return [preference] if preference in offered else []


class GatewayChannelsConnection(BaseKernelWebsocketConnection):
    """Proxies one browser kernel websocket to the gateway's ``/channels`` websocket.

    Set as ``ServerApp.kernel_websocket_connection_class`` by the ``gateway.client``
    extension. Life cycle, driven by jupyter-server's ``KernelWebsocketHandler``:
    ``prepare()`` (before the 101 answer) opens the gateway websocket, ``connect()`` (in
    ``open()``) starts forwarding, ``disconnect()`` (browser gone) closes the gateway side.
    """

    kernel_ws_protocol = Unicode(
        None,
        allow_none=True,
        config=True,
        help="""Kernel websocket subprotocol to use with the gateway and the browser.
        None (default): offer the gateway whatever the browser offered and answer the
        browser with the gateway's choice, so frames pass through unchanged.
        "": legacy JSON protocol only. A name (e.g. v1.kernel.websocket.jupyter.org):
        offer only that one. Change it only to work around a gateway that mishandles a
        subprotocol. After negotiation each connection holds the chosen protocol here.""",
    )

    replace_timeout = Float(
        5.0,
        config=True,
        help="""Seconds a reconnecting browser websocket waits for the previous gateway
        websocket of the same kernel and session to close before opening its own.
        Stock EG mishandles two concurrent websockets with one session id.""",
    )

    browser_open_timeout = Float(
        30.0,
        config=True,
        help="""Seconds the browser's handshake may take to complete once the gateway
        websocket is open; after that the gateway websocket is closed again.""",
    )

    upstream_ping_interval = Float(
        30.0,
        config=True,
        help="""Seconds between websocket pings to the gateway (0 disables). Keeps idle
        connections through proxies and notices a dead gateway.""",
    )

    relay_bytes = Bool(
        True,
        config=True,
        help="""Once both handshakes are done, copy bytes between the browser's and the
        gateway's sockets instead of parsing and re-sending each frame (about 1 ms less
        per execute round trip on 2 cores). Pings are then the gateway's, end to end
        (``upstream_ping_interval`` is not used). Off by itself when websocket compression
        is configured (the frames differ then).""",
    )

    quick_ack = Bool(
        True,
        config=True,
        help="""Acknowledge each frame from the gateway at once (TCP_QUICKACK), so a gateway
        that leaves Nagle on (stock Enterprise Gateway) sends its next frame without waiting
        ~40 ms for a delayed ACK. Costs a system call per frame; kernelfleet's gateway sets
        TCP_NODELAY itself, so its spawner turns this off.""",
    )

    _by_session: ClassVar[dict[str, GatewayChannelsConnection]] = {}

    def __init__(self, **kwargs: Any) -> None:
        """Create an unconnected proxy; see the class docstring for the life cycle."""
        super().__init__(**kwargs)
        self._upstream: HeldConnection | None = None
        self._upstream_socket: socket.socket | None = None
        self._upstream_closed = asyncio.Event()
        self._pending: list[Message] = []
        self._browser_open = False
        self._closing = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._relay = False

    @property
    def _relaying(self) -> bool:
        """Bytes are being copied between the two sockets (this process writes no frames)."""
        upstream = self._upstream
        return upstream is not None and upstream.protocol is not None and upstream.protocol.relaying

    @property
    def session_key(self) -> str:
        """``kernel_id:session_id``, the identity the gateway tracks a websocket by."""
        return f"{self.kernel_id}:{self.session_id}"

    @property
    def gateway_url(self) -> str:
        """The gateway's channels websocket URL for this kernel and session."""
        client = GatewayClient.instance()
        url = url_path_join(
            client.ws_url or "", client.kernels_endpoint, url_escape(self.kernel_id), "channels"
        )
        return f"{url}?session_id={url_escape(self.session_id)}"

    # -- life cycle, called by KernelWebsocketHandler --------------------------------

    async def prepare(self) -> None:
        """Open the gateway websocket before the browser's handshake is answered.

        Raises ``web.HTTPError`` (the browser's handshake then fails and JupyterLab checks
        the kernel over REST) when the gateway refuses or is unreachable, or when the
        gateway picked none of the subprotocols the browser offered.
        """
        while (previous := self._by_session.get(self.session_key)) not in (None, self):
            await self._retire(previous)
        self._by_session[self.session_key] = self
        offered = offered_subprotocols(self.websocket_handler.request.headers)
        offer = subprotocols_to_offer(self.kernel_ws_protocol, offered)
        # a compressed browser side carries other frames than the gateway side
        self._relay = self.relay_bytes and self.websocket_handler.get_compression_options() is None
        upstream = await self._open_upstream(offer)
        if self._closing:
            self._close_upstream()
            raise web.HTTPError(409, "Replaced by a newer connection of the same session")
        chosen = upstream.selected_subprotocol
        if offered and chosen not in offered:
            # Answering without a subprotocol would fail the browser's handshake *after*
            # open(); refusing now makes JupyterLab retry without subprotocols instead.
            self._close_upstream()
            raise web.HTTPError(400, "The gateway accepted none of the offered subprotocols")
        self.kernel_ws_protocol = chosen or ""
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(self.browser_open_timeout, self._abandon)

    async def connect(self) -> None:
        """The browser's handshake is done: forward what the gateway sent meanwhile.

        Relaying bytes, this returns only once the browser's side has closed (tornado reads
        the browser's frames after it returns: it then finds the socket closed)."""
        self._cancel_watchdog()
        self.websocket_handler.set_nodelay(True)
        self._browser_open = True
        if self._relay and self._upstream is not None and not self._upstream_closed.is_set():
            await self._relay_until_closed(self._upstream)
            return
        self._upstream_frames()
        pending, self._pending = self._pending, []
        for message in pending:
            self._send_to_browser(message)
        if self._upstream_closed.is_set():
            self._close_browser()

    async def _relay_until_closed(self, upstream: HeldConnection) -> None:
        handler = self.websocket_handler
        browser = handler.ws_connection
        # No frames of this process from now on: the gateway's pings cross both hops.
        ping_callback = getattr(handler, "ping_callback", None)
        if ping_callback is not None:
            ping_callback.stop()
        stop_pings(browser)
        assert upstream.protocol is not None
        gateway = upstream.protocol.stream
        after_read = None
        if self.quick_ack:
            sock = self._upstream_socket
            after_read = lambda: ack_now(sock)  # noqa: E731
        upstream.protocol.hand_over(browser.stream, after_read=after_read)
        await pump(browser.stream, gateway)
        # The browser went away (after the close handshake, or not): so does the gateway's
        # side; tornado then finds the browser's socket closed and calls disconnect().
        self._browser_open = False
        gateway.close()

    def disconnect(self) -> None:
        """The browser's websocket closed: close the gateway's (the gateway buffers)."""
        self._browser_open = False
        self._close_both()

    def handle_incoming_message(self, incoming_msg: Message) -> None:
        """Forward one frame from the browser to the gateway, unchanged."""
        upstream = self._upstream  # (only while not relaying: tornado reads no frames then)
        if upstream is None or self._upstream_closed.is_set():
            self.log.debug("Dropping a message for kernel %s: gateway closed", self.kernel_id)
            return
        try:
            upstream.write_message(incoming_msg, binary=isinstance(incoming_msg, bytes))
        except WebSocketClosedError:
            self.log.warning("Gateway websocket of kernel %s closed mid-write", self.kernel_id)

    def handle_outgoing_message(self, stream: str, outgoing_msg: list[Any]) -> None:
        """Unused: frames from the gateway are forwarded by `_on_upstream_message`."""
        raise NotImplementedError("gateway frames are forwarded as they arrive")

    @classmethod
    async def close_all(cls) -> None:
        """Close every proxied websocket (called by ServerApp on shutdown)."""
        for connection in list(cls._by_session.values()):
            connection._close_both()

    # -- the gateway side ------------------------------------------------------------

    async def _open_upstream(self, offer: list[str]) -> HeldConnection:
        """Connect to the gateway's channels websocket, with TCP_NODELAY set."""
        client = GatewayClient.instance()
        args = client.load_connection_args()
        path = self._notebook_path()
        if path:
            # the gateway's audit trail records which notebook ran the code
            args["headers"] = {**(args.get("headers") or {}), PATH_HEADER: quote(path)}
        request = HTTPRequest(self.gateway_url, **args)
        self.log.info("Connecting to gateway channels of kernel %s", self.kernel_id)
        try:
            upstream = await connect_held(
                request,
                on_message_callback=self._on_upstream_message,
                subprotocols=offer or None,
                # relayed, the gateway's pings reach the browser and its pongs come back
                ping_interval=None if self._relay else self.upstream_ping_interval or None,
            )
        except HTTPClientError as e:
            self._forget()
            refusal = refusal_from(e)
            status, message = (refusal.status, refusal.message) if refusal else (502, str(e))
            raise web.HTTPError(status, "Gateway refused the websocket: %s", message) from e
        except (OSError, StreamClosedError) as e:
            self._forget()
            raise web.HTTPError(503, "Cannot reach the gateway at %s: %s", client.ws_url, e) from e
        self._upstream = upstream
        self._upstream_socket = stream_socket(getattr(upstream.protocol, "stream", None))
        set_nodelay(self._upstream_socket)
        if not self._relay:
            self._upstream_frames()
        return upstream

    def _upstream_frames(self) -> None:
        """Have the gateway's frames read one by one (to ``_on_upstream_message``)."""
        if self._upstream is not None and self._upstream.protocol is not None:
            self._upstream.protocol.hand_over(None)

    def _close_upstream(self) -> None:
        """Close the gateway's websocket: with a close frame, or (relaying) its socket."""
        upstream = self._upstream
        if upstream is None:
            return  # still connecting; prepare() closes it as soon as it opens (_closing)
        if not self._relaying:
            self._upstream_frames()  # so that the gateway's answer to the close is read
        upstream.close()

    def _notebook_path(self) -> str | None:
        """The path of the notebook whose session uses this kernel (JupyterLab does not put
        it in execute requests). A local SQLite read: no round trip to the gateway."""
        manager = self.websocket_handler.settings.get("session_manager")
        try:
            row = manager.cursor.execute(
                "SELECT path FROM session WHERE kernel_id=?", (self.kernel_id,)
            ).fetchone()
        except Exception:  # no session manager, or no session table yet
            return None
        return str(row[0]) if row and row[0] else None

    def _on_upstream_message(self, message: Message | None) -> None:
        """A frame from the gateway (None: the gateway websocket closed)."""
        if message is None:
            self._on_upstream_closed()
            return
        if self.quick_ack:
            ack_now(self._upstream_socket)
        if self._browser_open:
            self._send_to_browser(message)
        else:
            self._pending.append(message)

    def _on_upstream_closed(self) -> None:
        """Forget this connection; if the browser did not ask for it, make it reconnect."""
        self._forget()
        if self._closing or not self._browser_open:
            return
        if self._relaying:
            # relayed: its close frame (if any) went to the browser, which may have asked
            self.log.info("Gateway side of kernel %s closed; closing the browser side",
                          self.kernel_id)  # fmt: skip
        else:
            self.log.warning(
                "Gateway closed the channels of kernel %s (code %s); closing the browser side",
                self.kernel_id,
                self._upstream.close_code if self._upstream is not None else None,
            )
        self._close_browser()

    def _forget(self) -> None:
        """Mark the gateway side closed and drop it from the per-session registry."""
        self._upstream_closed.set()
        if self._by_session.get(self.session_key) is self:
            del self._by_session[self.session_key]

    # -- the browser side and closing ------------------------------------------------

    def _send_to_browser(self, message: Message) -> None:
        try:
            self.websocket_handler.write_message(message, binary=isinstance(message, bytes))
        except WebSocketClosedError:
            self.log.debug("Browser websocket of kernel %s closed; dropped", self.kernel_id)

    def _close_browser(self) -> None:
        self._closing = True
        if self._browser_open:
            self._browser_open = False
            if self._relaying:
                # a close frame could land inside a relayed one: close the socket (the
                # browser sees 1006 and reconnects, as it does after 1011)
                browser = self.websocket_handler.ws_connection
                if browser is not None:
                    browser.stream.close()
            else:
                self.websocket_handler.close(1011, "Gateway connection closed")

    def _close_both(self) -> None:
        """Close both websockets; safe to call more than once."""
        self._cancel_watchdog()
        self._close_browser()
        self._close_upstream()

    async def _retire(self, previous: GatewayChannelsConnection) -> None:
        """Close ``previous`` (same kernel and session) and wait until the gateway saw it."""
        self.log.info("Closing the previous websocket of %s before reconnecting", self.session_key)
        previous._close_both()
        try:
            await asyncio.wait_for(previous._upstream_closed.wait(), self.replace_timeout)
        except asyncio.TimeoutError:
            self.log.warning("Previous websocket of %s did not close in time", self.session_key)
            previous._forget()

    def _abandon(self) -> None:
        if not self._browser_open and not self._closing:
            self.log.warning("Browser never completed the handshake for %s", self.session_key)
            self._close_both()

    def _cancel_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
