"""``POST /kernelfleet/kernels/{id}/notice``: the scheduler's words, shown in the notebook.

The scheduler (with the gateway's hub service token: an admin identity) sends eviction
warnings ("This GPU kernel has been idle for 25 minutes...") and, after an eviction, the
note for the user's next kernel ("Your python-gpu kernel was stopped at 14:02 after 30 min
idle."). Each becomes a ``stream`` message (``name: stderr``) on the kernel's IOPub channel,
written to every websocket client connected to that kernel, in the client's own protocol
(JSON, or ``v1.kernel.websocket.jupyter.org`` binary). Its parent header is that client's
last ``execute_request``, so JupyterLab shows it under the cell the user ran last, as it
does for output of a background thread (a client that ran nothing yet gets it without a
parent: JupyterLab's Log Console; ``jupyter console`` prints it either way).

The message is written by the gateway, not sent by the kernel, so it is not kernel
activity and cannot keep a kernel alive. When no client is connected yet (a note for a
kernel that was just started) it waits up to :data:`HOLD_S` for the first one.

Body ``{"text": "..."}``; answers ``{"delivered": n}`` (clients that got it now). Users
(non-admins) get 403: only the scheduler speaks here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from typing import Any

from tornado import web

from .auth import HubAuthMixin
from .errors import GatewayError

#: Seconds a notice waits for the first client of a kernel nobody is connected to.
HOLD_S = 120.0
_POLL_S = 0.5
MAX_TEXT = 2000

Clients = Callable[[str], list[Any]]


def open_channels(kernel_id: str) -> list[Any]:
    """The websocket handlers connected to ``kernel_id`` (jupyter_server's session registry)."""
    from jupyter_server.services.kernels.handlers import ZMQChannelsHandler

    prefix = f"{kernel_id}:"
    sessions = ZMQChannelsHandler._open_sessions  # session key "{kernel_id}:{session}"
    return [h for key, h in list(sessions.items()) if key.startswith(prefix)]


def deliver(handlers: Iterable[Any], text: str) -> int:
    """Write ``text`` as an IOPub stderr stream message to each handler; how many took it."""
    delivered = 0
    for handler in handlers:
        if getattr(handler, "ws_connection", None) is None:
            continue
        try:
            # builds the stream message in the client's protocol
            handler.write_stderr(text, getattr(handler, "kf_last_execute", {}))
        except Exception:  # a closing socket: the others still get it
            continue
        delivered += 1
    return delivered


async def deliver_when_connected(
    kernel_id: str, text: str, *, clients: Clients = open_channels, hold_s: float = HOLD_S
) -> int:
    """Deliver to the first clients of ``kernel_id`` that connect within ``hold_s``."""
    loop = asyncio.get_running_loop()
    until = loop.time() + hold_s
    while loop.time() < until:
        await asyncio.sleep(_POLL_S)
        delivered = deliver(clients(kernel_id), text)
        if delivered:
            return delivered
    return 0


class NoticeHandler(HubAuthMixin, web.RequestHandler):
    """``POST /kernelfleet/kernels/{kernel_id}/notice`` (admins only: the scheduler)."""

    _held: set[asyncio.Task[int]] = set()

    async def post(self, kernel_id: str) -> None:
        if not self.identity.admin:
            raise GatewayError(403, "Only the scheduler may send kernel notices.", code="forbidden")
        text = _text_of(self.request.body)
        delivered = deliver(open_channels(kernel_id), text)
        if not delivered:
            task = asyncio.ensure_future(deliver_when_connected(kernel_id, text))
            self._held.add(task)
            task.add_done_callback(self._held.discard)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"delivered": delivered}))


def _text_of(body: bytes) -> str:
    try:
        text = json.loads(body or b"{}").get("text")
    except (ValueError, AttributeError):
        text = None
    if not isinstance(text, str) or not text.strip():
        raise GatewayError(400, 'Body must be {"text": "..."}.', code="bad_json")
    return text[:MAX_TEXT]


def notice_handlers(base_url: str = "/") -> list[tuple[str, type]]:
    """The handler table entry for ``<base_url>kernelfleet/kernels/{id}/notice``."""
    return [(base_url.rstrip("/") + r"/kernelfleet/kernels/([^/]+)/notice", NoticeHandler)]
