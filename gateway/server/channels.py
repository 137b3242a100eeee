"""The kernel channels websocket: owner check, TCP_NODELAY, and fast same-session reconnects.

:class:`ChannelsMixin` goes before EG's ``ZMQChannelsHandler`` (jupyter_server 1.24's) and
changes five things:

- ``get``: someone else's kernel is 404, before anything else happens;
- ``open``: sets TCP_NODELAY on the upgraded socket (Nagle costs ~40 ms a message), and drops
  a buffer kept for this session whose channels are missing or closed instead of restoring
  from it (stock crashes with ``KeyError: 'iopub'``);
- ``_register_session``: a stale connection with the same session id is closed politely for
  at most ``stale_connection_timeout`` seconds, then torn down (stock waits without limit);
  a stale one that has not finished its upgrade yet is told to give up;
- ``on_close``: a connection that never opened, or was replaced, neither counts as a
  disconnect nor buffers messages for the session that replaced it;
- ``nudge``: a kernel known to welcome new iopub subscriptions is not nudged with
  kernel_info requests; its welcome confirms the connection (:mod:`.welcome`), and the
  welcomes meant for other connections are not passed on to this one's client.
"""

from __future__ import annotations

from typing import Any

from .errors import GatewayError
from .reconnect import close_within, usable_buffer
from .welcome import is_welcome, welcome_nudge, welcomes

STALE_TIMEOUT_SETTING = "kf_stale_connection_timeout"
#: Seconds a connection waits for its iopub welcome before falling back to the stock nudge.
WELCOME_TIMEOUT_S = 2.0


class ChannelsMixin:
    """Kernelfleet's changes to the channels websocket handler (see module docstring)."""

    _kf_opened = False
    _kf_replaced = False
    _kf_closed = False
    _kf_ws: Any = None

    # Provided by the handler classes this is mixed into.
    kernel_id: str
    session_key: str
    session: Any
    channels: dict[str, Any]
    settings: dict[str, Any]
    kernel_manager: Any
    log: Any
    ws_connection: Any
    _open_sessions: dict[str, Any]
    _close_future: Any
    _on_close_called: bool

    async def get(self, kernel_id: str) -> None:
        self.require_kernel_access(kernel_id)  # type: ignore[attr-defined]
        await super().get(kernel_id)  # type: ignore[misc]

    async def pre_get(self) -> None:
        await super().pre_get()  # type: ignore[misc]
        # Waiting for kernel_info can take seconds; meanwhile the client may have gone away or
        # reconnected. Upgrading now would open zmq streams nobody closes.
        if self._kf_closed:
            raise GatewayError(
                400, "The client closed the connection while it was opening.", code="client_gone"
            )
        if self._kf_replaced:
            raise GatewayError(
                409,
                "A newer connection with the same session id replaced this one.",
                code="session_replaced",
            )

    async def _register_session(self) -> None:
        self.session_key = f"{self.kernel_id}:{self.session.session}"
        stale = self._open_sessions.get(self.session_key)
        if stale is not None and stale is not self:
            self.log.info("Replacing stale connection: %s", self.session_key)
            await stale.kf_replace(timeout_s=self.settings.get(STALE_TIMEOUT_SETTING, 1.0))
        if self.kernel_id in self.kernel_manager:
            self._open_sessions[self.session_key] = self

    async def kf_replace(self, *, timeout_s: float) -> None:
        """Give way to a newer connection with the same session id, within ``timeout_s``."""
        self._kf_replaced = True
        if self._open_sessions.get(self.session_key) is self:
            self._open_sessions.pop(self.session_key)
        if not self._kf_opened or self._kf_closed:
            return  # still upgrading: pre_get/open see _kf_replaced and give up
        if await close_within(self.close, self._kf_force_close, timeout_s=timeout_s):  # type: ignore[attr-defined]
            self.log.info("Stale connection %s did not close in time; dropped it", self.session_key)

    def _kf_force_close(self) -> None:
        ws = self._kf_ws
        if ws is not None and ws.stream is not None and not ws.stream.closed():
            ws.stream.close()
        if not self._on_close_called:
            self._on_close_called = True
            self.on_close()

    def open(self, kernel_id: str) -> Any:
        self._kf_ws = self.ws_connection
        self.set_nodelay(True)  # type: ignore[attr-defined]
        if self._kf_replaced or self._kf_closed:
            self.close()  # type: ignore[attr-defined]
            return None
        self._kf_opened = True
        self._drop_unusable_buffer(kernel_id)
        return super().open(kernel_id)  # type: ignore[misc]

    def nudge(self) -> Any:
        kernel = self.kernel_manager.get_kernel(self.kernel_id)
        if not welcomes(kernel) or getattr(kernel, "execution_state", None) == "busy":
            return super().nudge()  # type: ignore[misc]

        def still_starting() -> bool:
            return getattr(kernel, "execution_state", None) == "starting"

        return welcome_nudge(self.channels["iopub"], fallback=super().nudge,  # type: ignore[misc]
                             timeout_s=WELCOME_TIMEOUT_S, kernel_id=self.kernel_id,
                             still_starting=still_starting)  # fmt: skip

    def _on_zmq_reply(self, stream: Any, msg_list: list[Any]) -> None:
        if is_welcome(msg_list):
            return  # the kernel welcoming another connection of the gateway's
        super()._on_zmq_reply(stream, msg_list)  # type: ignore[misc]

    def _drop_unusable_buffer(self, kernel_id: str) -> None:
        km = self.kernel_manager
        buffers = km._kernel_buffers
        if kernel_id in buffers and not usable_buffer(buffers[kernel_id], self.session_key):
            self.log.info("Not restoring %s from a buffer with closed channels", self.session_key)
            km.stop_buffering(kernel_id)

    def on_close(self) -> None:
        if self._kf_closed:
            return
        self._kf_closed = True
        if self._kf_opened and not self._kf_replaced:
            super().on_close()  # type: ignore[misc]
            return
        self._close_without_buffering()

    def _close_without_buffering(self) -> None:
        if self._open_sessions.get(getattr(self, "session_key", "")) is self:
            self._open_sessions.pop(self.session_key)
        km = self.kernel_manager
        if self._kf_opened and self.kernel_id in km:
            km.notify_disconnect(self.kernel_id)
            km.remove_restart_callback(self.kernel_id, self.on_kernel_restarted)  # type: ignore[attr-defined]
            km.remove_restart_callback(self.kernel_id, self.on_restart_failed, "dead")  # type: ignore[attr-defined]
        for stream in self.channels.values():
            if stream is not None and not stream.closed():
                stream.on_recv(None)
                stream.close()
        self.channels = {}
        if not self._close_future.done():
            self._close_future.set_result(None)
