"""One IOPub subscription per kernel in the gateway, shared by its activity watch and its
connections.

Stock EG (jupyter_server 1.24) subscribes to a kernel's IOPub once for its activity watch
and once more for every channels connection. So every output, status and result message is
published by the kernel twice and received, read and routed by the gateway twice, though
both copies are the same bytes, arriving in the same process, on the same event loop. With
one browser connected, sharing one subscription took 5-14% off the gateway's CPU per ``1+1``
round trip (bench/README.md, finding 27).

Here the activity watch's subscription is the only one: :class:`SharedIOPub` (one per
kernel) hands each message first to the watch, then to each connection's :class:`IOPubView`.
A view has the part of ``ZMQStream``'s interface that jupyter_server, EG and kernelfleet use
on an iopub stream, with the same behaviour a connection's own socket had:

- while a view has no receive callback (before ``on_recv``, during ``stop_on_recv``) its
  messages wait for one, as they would wait in a socket, and are handed over in order on a
  later loop pass once a callback is set; beyond :data:`WAITING_LIMIT` (ZMQ's default
  receive high-water mark) new ones are dropped, as ZMQ drops them;
- closing a view stops its messages and nothing else; the shared subscription lives as
  long as the kernel's activity watch;
- ``socket`` is the shared socket, so a connection can add and remove subscriptions of its
  own (:mod:`.welcome` subscribes a topic per connection and waits for the kernel's welcome
  to it);
- an exception in one connection's callback is logged and does not keep the message from
  the others.

A view also sees the messages published since it was made, where a socket of its own would
see them only once its subscription reached the kernel: a connection can miss nothing a
stock one would have received.

When the watch is restarted on new ports (a remote kernel's restart), the views follow the
new subscription. A kernel without a running watch gets stock, separate streams.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq
from zmq.eventloop.zmqstream import gen_log

#: The attribute of a KernelManager holding its :class:`SharedIOPub`.
SHARED = "kf_shared_iopub"
#: Messages a view keeps while it has no callback (ZMQ's default RCVHWM).
WAITING_LIMIT = 1000

Frames = list[bytes]


class SharedIOPub:
    """A kernel's one IOPub stream in the gateway and the views of its connections."""

    def __init__(self) -> None:
        self.stream: Any = None  # the activity watch's ZMQStream while it runs
        self.views: list[IOPubView] = []

    def attach(self, stream: Any, first: Callable[[Frames], None]) -> None:
        """Make ``stream`` the shared subscription: each of its messages goes to ``first``
        (the activity watch) and then to every open view."""
        self.stream = stream
        views = self.views

        def dispatch(msg_list: Frames) -> None:
            first(msg_list)
            if views:
                for view in tuple(views):
                    view._receive(msg_list)

        stream.on_recv(dispatch)

    def live(self) -> bool:
        """Whether connections can share the subscription now."""
        return self.stream is not None and not self.stream.closed()

    def view(self) -> IOPubView:
        """A new connection's iopub stream."""
        view = IOPubView(self)
        self.views.append(view)
        return view


def shared_iopub(kernel: Any) -> SharedIOPub:
    """``kernel``'s :class:`SharedIOPub` (made on first use)."""
    shared = getattr(kernel, SHARED, None)
    if shared is None:
        shared = SharedIOPub()
        setattr(kernel, SHARED, shared)
    return shared


class _ClosedSocket:
    """What a closed view's ``socket`` is: closed, and refusing to be used."""

    closed = True

    def setsockopt(self, option: int, value: Any) -> None:
        raise zmq.ZMQError(zmq.ENOTSOCK)


CLOSED_SOCKET = _ClosedSocket()


class IOPubView:
    """A connection's iopub stream on the kernel's shared subscription (module doc)."""

    channel: str | None = None  # set by jupyter_server, as on a ZMQStream

    def __init__(self, shared: SharedIOPub) -> None:
        self._shared = shared
        self._callback: Callable[..., Any] | None = None
        self._with_stream = False
        self._waiting: deque[Frames] = deque()
        self._handing_over = False
        self._closed = False

    # -- ZMQStream's interface ---------------------------------------------------------------

    @property
    def socket(self) -> Any:
        """The shared SUB socket; once this view is closed or the kernel's watch has stopped,
        a closed socket (``closed`` is True, as a closed stream's socket says)."""
        if self.closed():
            return CLOSED_SOCKET
        return self._shared.stream.socket

    def on_recv(self, callback: Callable[[Frames], Any] | None, copy: bool = True) -> None:
        self._set(callback, with_stream=False, copy=copy)

    def on_recv_stream(
        self, callback: Callable[[Any, Frames], Any] | None, copy: bool = True
    ) -> None:
        self._set(callback, with_stream=True, copy=copy)

    def stop_on_recv(self) -> None:
        self._set(None, with_stream=False, copy=True)

    def receiving(self) -> bool:
        return self._callback is not None

    def sending(self) -> bool:
        return False

    def closed(self) -> bool:
        return self._closed or not self._shared.live()

    def close(self, linger: int | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._callback = None
        self._waiting.clear()
        if self in self._shared.views:
            self._shared.views.remove(self)

    def flush(self, flag: int = zmq.POLLIN, limit: int | None = None) -> int:
        """Hand over what has arrived: messages already waiting in the shared socket go to
        every view (and the watch); this view's waiting ones to its callback."""
        stream = self._shared.stream
        count = 0
        if stream is not None and not stream.closed() and flag & zmq.POLLIN:
            count = stream.flush(zmq.POLLIN, limit)
        self._hand_over()
        return count

    # -- delivery ----------------------------------------------------------------------------

    def _set(self, callback: Callable[..., Any] | None, *, with_stream: bool, copy: bool) -> None:
        if not copy:
            raise ValueError("a shared iopub stream hands over bytes only (copy=True)")
        if self._closed:
            return
        self._callback, self._with_stream = callback, with_stream
        if callback is not None and self._waiting and not self._handing_over:
            self._handing_over = True
            asyncio.get_running_loop().call_soon(self._hand_over)

    def _receive(self, msg_list: Frames) -> None:
        if self._closed:
            return
        if self._callback is None or self._waiting:
            if len(self._waiting) < WAITING_LIMIT:
                self._waiting.append(msg_list)
            return
        self._run(msg_list)

    def _hand_over(self) -> None:
        self._handing_over = False
        while self._waiting and self._callback is not None:
            self._run(self._waiting.popleft())

    def _run(self, msg_list: Frames) -> None:
        callback = self._callback
        assert callback is not None
        try:
            result = callback(self, msg_list) if self._with_stream else callback(msg_list)
            if result is not None and inspect.isawaitable(result):
                asyncio.ensure_future(result)
        except Exception:
            gen_log.error("Uncaught exception in a kernel iopub callback", exc_info=True)
