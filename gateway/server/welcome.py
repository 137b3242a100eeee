"""Channel openings confirmed by the kernel's iopub welcome instead of kernel_info nudges.

Before jupyter_server 1.24 (EG's) reads a new channels connection's first message, it
"nudges": two more sockets, kernel_info_request on shell and control, repeated until a reply
*and* an iopub message have arrived, so that the client cannot miss output because its iopub
subscription was not live yet. Measured on this machine that costs 13-25 ms per connection,
and a JupyterLab tab waits that long for its first kernel_info_reply - a third of a warm
start.

ipykernel 7 publishes an ``iopub_welcome`` message to every *new* subscription (JEP 65),
from its IOPub thread, without involving the shell. Its XPUB socket reports only topics
nobody has subscribed to yet, and EG's activity watch already subscribes to everything, so
a connection's usual subscription to "" is never welcomed. So the connection also
subscribes to a topic of its own: the welcome addressed to that topic proves the
subscription is live, in about a millisecond, and the topic is dropped again. Every
subscription to "" receives that welcome too: :func:`is_welcome` lets other connections
drop it and the activity watch ignore it (opening a connection is not kernel activity).

Whether a kernel welcomes is learnt once per kernel by :func:`probe` (the warm pool probes
before a kernel is handed out; other kernels are probed in the background once started).
Kernels that do not welcome (other languages, older ipykernel), kernels not probed yet,
busy kernels, and a welcome that does not come within ``timeout_s`` get the stock nudge.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import zmq
import zmq.asyncio

log = logging.getLogger("kernelfleet.gateway")

#: The attribute of a KernelManager saying its kernel welcomes new iopub subscriptions.
WELCOMES = "kf_iopub_welcome"
#: How the topics of the gateway's own subscriptions start (and so the welcomes to them).
TOPIC_PREFIX = b"kf-welcome-"
PROBE_TIMEOUT_S = 2.0

_context: zmq.asyncio.Context | None = None


def shared_context() -> zmq.asyncio.Context:
    """One asyncio ZMQ context (one I/O thread) for the gateway's own kernel connections:
    warm kernels' shell clients and welcome probes."""
    global _context
    if _context is None:
        _context = zmq.asyncio.Context()
    return _context


def welcomes(km: Any) -> bool:
    """Whether :func:`probe` saw this kernel welcome a new iopub subscription."""
    return getattr(km, WELCOMES, False) is True


def _topic() -> bytes:
    return TOPIC_PREFIX + uuid.uuid4().hex.encode()


def is_welcome(msg_list: list[Any]) -> bool:
    """Whether an iopub message (ZMQ frames) is a kernel's welcome to one of the gateway's
    own subscription topics."""
    first = msg_list[0] if msg_list else b""
    return isinstance(first, bytes) and first.startswith(TOPIC_PREFIX)


async def probe(km: Any, *, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Subscribe to ``km``'s iopub with a topic of our own and wait for the welcome;
    remembers on ``km`` (:data:`WELCOMES`) and returns whether it came."""
    topic = _topic()
    socket = shared_context().socket(zmq.SUB)
    try:
        socket.linger = 0
        socket.setsockopt(zmq.SUBSCRIBE, topic)
        socket.connect(km._make_url("iopub"))
        async with asyncio.timeout(timeout_s):
            while (await socket.recv_multipart())[0] != topic:
                pass
        welcomed = True
    except (TimeoutError, zmq.ZMQError):
        welcomed = False
    finally:
        socket.close()
    setattr(km, WELCOMES, welcomed)
    return welcomed


def probe_soon(km: Any, kernel_id: str) -> None:
    """:func:`probe` in the background (a started kernel's first connection may use it)."""

    async def run() -> None:
        try:
            welcomed = await probe(km)
        except Exception:  # a kernel that died meanwhile: stock nudges
            log.debug("Welcome probe of kernel %s failed", kernel_id, exc_info=True)
            return
        log.debug("Kernel %s %s new iopub subscriptions", kernel_id,
                  "welcomes" if welcomed else "does not welcome")  # fmt: skip

    asyncio.ensure_future(run())


def welcome_nudge(
    stream: Any,
    *,
    fallback: Callable[[], Awaitable[Any]],
    timeout_s: float,
    kernel_id: str,
    still_starting: Callable[[], bool] = lambda: False,
) -> asyncio.Future[None]:
    """A nudge for a kernel that welcomes: resolves when the welcome for a topic of this
    connection arrives on ``stream`` (its iopub ZMQStream), else after ``timeout_s`` runs
    ``fallback`` (the stock nudge). Other iopub messages meanwhile are dropped, as the stock
    nudge drops them: the client is not subscribed yet. If ``still_starting()`` after the
    welcome (no status from the kernel has reached EG yet), the stock nudge runs too: its
    kernel_info makes the kernel publish its state, which the activity watch (and so idle
    eviction) needs."""
    topic = _topic()
    welcomed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_iopub(msg_list: list[bytes]) -> None:
        if msg_list and msg_list[0] == topic and not welcomed.done():
            welcomed.set_result(None)

    def stop() -> None:
        if not stream.closed():  # the client may have gone meanwhile (closing the stream)
            stream.stop_on_recv()

    async def wait() -> None:
        if stream.closed():
            return
        stream.on_recv(on_iopub)
        socket = stream.socket  # kept: a closed connection's topic must still be dropped
        socket.setsockopt(zmq.SUBSCRIBE, topic)
        try:
            await asyncio.wait_for(asyncio.shield(welcomed), timeout_s)
        except asyncio.TimeoutError:
            log.warning("Kernel %s sent no iopub welcome in %.1f s; nudging it instead",
                        kernel_id, timeout_s)  # fmt: skip
            stop()
            await fallback()
        else:
            stop()
            if still_starting():
                await fallback()
        finally:
            # a socket of its own is closed with the stream; a shared one lives on
            if not socket.closed:
                socket.setsockopt(zmq.UNSUBSCRIBE, topic)

    return asyncio.ensure_future(wait())
