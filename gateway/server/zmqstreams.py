"""Kernel channel streams with less Python per message than pyzmq 24's ``ZMQStream``.

EG 3.3 pins pyzmq below 25, whose ``ZMQStream`` costs the gateway several times the work of
the message itself on every kernel message (py-spy during ``1+1`` round trips: ~a fifth of
the gateway's samples with the GIL held were the stream's own bookkeeping):

- it reads ``socket.EVENTS`` through attribute lookup and tests it against ``zmq.POLLIN``,
  an ``IntFlag``: each ``&`` builds a new enum member;
- it handles one message per wake-up, then asks the socket again and schedules another
  loop callback to find the next one;
- ``send_multipart`` only queues (a thread-safe ``queue.Queue``, with its lock) and sends on
  a later loop pass, so every request to the kernel waits for one more loop iteration.

:class:`ChannelStream` keeps ``ZMQStream``'s interface and behaviour and changes how:
events are read as plain ints; a wake-up hands over the messages already waiting (up to
:data:`DRAIN_LIMIT`, so one busy kernel cannot starve the others); a send with nothing
queued before it goes out at once, non-blocking, and falls back to the queue only when the
socket cannot take it now (or the caller asked for a send callback). Order is kept both
ways: received messages reach the callback in the order the socket gives them, and a send
never overtakes one still queued.

ZMQ's file descriptor is edge-triggered: after any send or receive the socket may hold
messages that will not wake the loop again, so after each wake-up and each direct send the
stream checks ``EVENTS`` and, if input is waiting, schedules itself (as ``ZMQStream`` does).
"""

from __future__ import annotations

from typing import Any

import zmq
from jupyter_client.connect import ConnectionFileMixin
from zmq.eventloop.zmqstream import ZMQStream, gen_log

from .iopub import shared_iopub

_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_NOBLOCK = int(zmq.NOBLOCK)

#: Messages handed over per wake-up before other sockets get their turn.
DRAIN_LIMIT = 32


class ChannelStream(ZMQStream):
    """A ``ZMQStream`` that drains, sends at once, and reads events as ints (module doc)."""

    def _handle_events(self, fd: Any, events: Any) -> None:
        socket = self.socket
        if not socket:
            gen_log.warning("Got events for closed stream %s", self)
            return
        try:
            ready: int | None = socket.get(_EVENTS)
        except zmq.ContextTerminated:
            gen_log.warning("Got events for stream %s after terminating context", self)
            return
        try:
            handled = 0
            while ready & _POLLIN and self._recv_callback is not None and not self._flushed:
                try:
                    msg = socket.recv_multipart(_NOBLOCK, copy=self._recv_copy)
                except zmq.Again:
                    ready = None  # not what EVENTS said: ask again
                    break
                self._run_callback(self._recv_callback, msg)
                socket = self.socket
                if not socket:
                    return
                handled += 1
                ready = socket.get(_EVENTS)
                if handled >= DRAIN_LIMIT:
                    break
            if ready is not None and ready & _POLLOUT and self.sending():
                self._handle_send()
                if not self.socket:
                    return
                ready = None  # a send changes what the socket holds: ask it again
            self._rebuild_io_state(ready)
        except Exception:
            gen_log.error("Uncaught exception in zmqstream callback", exc_info=True)
            raise

    def _rebuild_io_state(self, ready: int | None = None) -> None:
        """``ready``: the socket's EVENTS if just read with nothing done since."""
        if self.socket is None:
            return
        state = 0
        if self._recv_callback is not None:
            state |= _POLLIN
        if self.sending():
            state |= _POLLOUT
        self._state = state
        self._update_handler(state, ready)

    def _update_handler(self, state: int, ready: int | None = None) -> None:
        socket = self.socket
        if socket is None:
            return
        if ready is None:
            ready = socket.get(_EVENTS)
        if int(state) & ready:
            # Edge-triggered: what is already waiting will not wake the loop again.
            self.io_loop.add_callback(lambda: self._handle_events(self.socket, 0))

    def send_multipart(  # type: ignore[override]
        self,
        msg: Any,
        flags: int = 0,
        copy: bool = True,
        track: bool = False,
        callback: Any = None,
        **kwargs: Any,
    ) -> None:
        socket = self.socket
        if callback is not None or self._send_callback is not None or track or kwargs:
            super().send_multipart(msg, flags, copy, track, callback, **kwargs)
            return
        if socket is not None and self._send_queue.empty():
            try:
                socket.send_multipart(msg, flags | _NOBLOCK, copy=copy)
            except zmq.Again:
                pass  # the socket cannot take it now: queue it
            except zmq.ZMQError as e:
                gen_log.error("SEND Error: %s", e)  # what ZMQStream does with a failed send
                return
            else:
                self._update_handler(self._state)
                return
        # Queued as ZMQStream queues it, minus its no-op send callback: once set, that one
        # would route every later send through the queue.
        self._check_closed()
        self._send_queue.put((msg, {"flags": flags, "copy": copy, "track": track}))
        self._add_io_state(_POLLOUT)


#: ChannelStream is written against pyzmq 24's ZMQStream internals (EG 3.3 pins pyzmq < 25).
_STREAM = ChannelStream if zmq.pyzmq_version_info() < (25,) else ZMQStream


def _channel(name: str) -> Any:
    connect = getattr(ConnectionFileMixin, f"connect_{name}")

    def connect_channel(self: Any, *args: Any, **kwargs: Any) -> ZMQStream:
        return _STREAM(connect(self, *args, **kwargs), self.loop)

    connect_channel.__name__ = f"connect_{name}"
    connect_channel.__doc__ = f"The kernel's {name} channel as a :class:`ChannelStream`."
    return connect_channel


_connect_iopub = _channel("iopub")


class ChannelStreamsMixin:
    """For a kernel manager: its shell, control and stdin sockets as ChannelStreams, and
    its iopub as a view of the subscription the activity watch holds (:mod:`.iopub`), or,
    while no watch runs (the watch's own subscription is made then), a ChannelStream."""

    connect_shell = _channel("shell")
    connect_control = _channel("control")
    connect_stdin = _channel("stdin")

    def connect_iopub(self, identity: bytes | None = None) -> Any:
        shared = shared_iopub(self)
        if shared.live():
            return shared.view()
        return _connect_iopub(self, identity=identity)
