"""A cheaper kernel activity watcher for EG's hot path.

jupyter_server 1.24 (inside EG) watches every kernel's IOPub on a second subscription and,
for each message, fully deserializes it (signature, dates, twice for ``status``) and logs a
debug line, only to keep ``last_activity`` and ``execution_state``. On the bench machine
that was ~0.9 ms of gateway CPU per ``1+1`` round trip, about a sixth of the gateway's
share (bench/README.md).

:class:`LightActivityWatchMixin` keeps the same attributes with the same meaning - every
IOPub message is activity, ``status`` messages set the execution state - but reads only
the header of each message, and checks the signature only of the ``status`` messages it
believes (a forged one must not make a busy kernel look idle to the eviction sweep). The
kernel's welcomes to the gateway's own subscriptions (:mod:`.welcome`) are not activity: a
browser tab reconnecting does not keep an idle kernel alive.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from jupyter_server._tz import utcnow

from .iopub import shared_iopub
from .welcome import is_welcome

DELIMITER = b"<IDS|MSG>"


def execution_state_of(msg_list: list[bytes], session: Any) -> str | None:
    """The ``execution_state`` of a signed ``status`` message, else None.

    ``msg_list`` is one IOPub message as ZMQ frames (identities, delimiter, signature,
    header, parent header, metadata, content, buffers); ``session`` is the kernel's
    jupyter_client Session (its ``auth`` is None when messages are not signed).
    """
    try:
        start = msg_list.index(DELIMITER) + 1
        signature, header, parent, metadata, content = msg_list[start : start + 5]
        # most messages are not status: no JSON parse for them (a JSON encoder writes the
        # string "status" as these bytes)
        if b'"status"' not in header or json.loads(header).get("msg_type") != "status":
            return None
    except (ValueError, AttributeError):
        return None
    if session.auth is not None:
        expected = session.sign([header, parent, metadata, content])
        if not hmac.compare_digest(signature, expected):
            return None
    try:
        state = json.loads(content).get("execution_state")
    except (ValueError, AttributeError):
        return None
    return state if isinstance(state, str) else None


class LightActivityWatchMixin:
    """Overrides ``start_watching_activity`` of jupyter_server's MappingKernelManager.

    Sets, like the stock method: ``kernel.execution_state`` ("starting", then from status
    messages), ``kernel.reason``, ``kernel.last_activity`` and the manager's
    ``last_kernel_activity`` (on every IOPub message), and ``kernel._activity_stream``
    (closed by the stock ``stop_watching_activity``). The watch's subscription is the one
    the kernel's channels connections share (:mod:`.iopub`): it sees each message first.
    """

    _kernels: dict[str, Any]
    last_kernel_activity: Any

    def start_watching_activity(self, kernel_id: str) -> None:
        """Watch ``kernel_id``'s IOPub for activity (see the class docstring)."""
        kernel = self._kernels[kernel_id]
        kernel.execution_state = "starting"
        kernel.reason = ""
        kernel.last_activity = utcnow()
        kernel._activity_stream = kernel.connect_iopub()
        session = kernel.session

        def record_activity(msg_list: list[bytes]) -> None:
            if is_welcome(msg_list):
                return
            self.last_kernel_activity = kernel.last_activity = utcnow()
            state = execution_state_of(msg_list, session)
            if state is not None:
                kernel.execution_state = state

        shared_iopub(kernel).attach(kernel._activity_stream, record_activity)
