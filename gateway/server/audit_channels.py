"""Auditing on the channels websocket: every execution passes the gateway's recorder.

:class:`AuditChannelsMixin` goes into the channels handler's bases (handlers.py). For
each message a client sends, :func:`parse_client_message` reads the header (all three wire
formats: JSON text, legacy binary, and ``v1.kernel.websocket.jupyter.org``); an
``execute_request`` (or a debugger ``evaluate``) on the shell or control channel (ipykernel
executes both) is recorded before it is forwarded. The kernel's ``execute_reply`` (or
``debug_reply``) is matched on its way back for the outcome and duration.

Headers are parsed as JSON every time rather than searched for a substring: a JSON escape
(``execute\\u005frequest``) must not slip an execution past the recorder.

When the trail refuses (strict mode, audit log unwritable), the request never reaches the
kernel; the client gets the usual message sequence of a failed cell (busy, ``error``,
``execute_reply`` with status error, idle) whose text says why.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from .audit import AuditUnavailable, ExecuteRequest

V1_PROTOCOL = "v1.kernel.websocket.jupyter.org"
EXECUTING_CHANNELS = ("shell", "control")
PATH_HEADER = "X-Kernelfleet-Notebook-Path"
REFUSAL_ENAME = "AuditUnavailable"


@dataclass(frozen=True)
class ClientMessage:
    """The parts of a client message the recorder needs."""

    channel: str
    header: Mapping[str, Any]
    metadata: Mapping[str, Any]
    content: Mapping[str, Any]


def _json_object(data: bytes | str) -> Mapping[str, Any]:
    value = json.loads(data)
    return value if isinstance(value, Mapping) else {}


def _decode_v1(data: bytes) -> ClientMessage:
    count = int.from_bytes(data[:8], "little")
    if count < 3 or 8 * (count + 1) > len(data):  # a forged count must not cost a long loop
        raise ValueError("bad v1 frame")
    offsets = [int.from_bytes(data[8 * (i + 1) : 8 * (i + 2)], "little") for i in range(count)]
    parts = [data[offsets[i] : offsets[i + 1]] for i in range(count - 1)]
    channel = parts[0].decode()
    header = _json_object(parts[1])
    metadata: Mapping[str, Any] = {}
    content: Mapping[str, Any] = {}
    if header.get("msg_type") in ("execute_request", "debug_request"):
        metadata, content = _json_object(parts[3]), _json_object(parts[4])
    return ClientMessage(channel, header, metadata, content)


def _decode_legacy_binary(data: bytes) -> ClientMessage:
    count = struct.unpack("!i", data[:4])[0]
    if count < 1 or 4 * (count + 1) > len(data):
        raise ValueError("bad binary frame")
    offsets = list(struct.unpack("!" + "I" * count, data[4 : 4 * (count + 1)]))
    end = offsets[1] if count > 1 else len(data)
    return _from_dict(_json_object(data[offsets[0] : end].decode()))


def _from_dict(msg: Mapping[str, Any]) -> ClientMessage:
    return ClientMessage(
        str(msg.get("channel") or "shell"),
        _mapping(msg.get("header")),
        _mapping(msg.get("metadata")),
        _mapping(msg.get("content")),
    )


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def parse_client_message(ws_msg: str | bytes, *, v1: bool) -> ClientMessage | None:
    """The message a client sent (None if it cannot be read: jupyter_server drops it too)."""
    try:
        if isinstance(ws_msg, str):
            return _from_dict(_json_object(ws_msg))
        return _decode_v1(ws_msg) if v1 else _decode_legacy_binary(ws_msg)
    except (ValueError, IndexError, UnicodeDecodeError, struct.error):
        return None


def execution_of(message: ClientMessage, *, notebook_path: str = "") -> ExecuteRequest | None:
    """The execution ``message`` asks for, if any (execute_request, debugger evaluate)."""
    if message.channel not in EXECUTING_CHANNELS:
        return None
    msg_type = message.header.get("msg_type")
    content = message.content
    if msg_type == "execute_request":
        code, kind = content.get("code", ""), "execute_request"
    elif msg_type == "debug_request" and content.get("command") == "evaluate":
        code, kind = _mapping(content.get("arguments")).get("expression", ""), "debug_evaluate"
    else:
        return None
    metadata = message.metadata
    return ExecuteRequest(
        msg_id=str(message.header.get("msg_id") or ""),
        code=code if isinstance(code, str) else json.dumps(code),
        session=str(message.header.get("session") or ""),
        silent=bool(content.get("silent", False)),
        notebook_path=str(metadata.get("notebook_path") or notebook_path),
        cell_id=str(metadata.get("cellId") or metadata.get("cell_id") or ""),
        kind=kind,
    )


def reply_of(msg_list: list[Any], session: Any) -> tuple[str, Mapping[str, Any]] | None:
    """``(parent msg_id, outcome content)`` if a kernel message answers an execution."""
    try:
        _, parts = session.feed_identities(msg_list)
        parts = [getattr(part, "bytes", part) for part in parts]
        header = _json_object(parts[1])
        msg_type = header.get("msg_type")
        if msg_type not in ("execute_reply", "debug_reply"):
            return None
        parent, content = _json_object(parts[2]), dict(_json_object(parts[4]))
    except (ValueError, IndexError, TypeError):
        return None
    if msg_type == "debug_reply":
        if content.get("command") != "evaluate":
            return None
        content = {"status": "ok" if content.get("success") else "error", "ename": "DebugError",
                   "evalue": str(content.get("message") or "")}  # fmt: skip
    return str(parent.get("msg_id") or ""), content


def encode_v1(channel: str, parts: list[bytes]) -> bytes:
    """A ``v1.kernel.websocket.jupyter.org`` frame: offsets, channel, message parts."""
    offsets = [8 * (len(parts) + 3)]
    for chunk in [channel.encode(), *parts]:
        offsets.append(offsets[-1] + len(chunk))
    head = len(offsets).to_bytes(8, "little") + b"".join(o.to_bytes(8, "little") for o in offsets)
    return head + channel.encode() + b"".join(parts)


class AuditChannelsMixin:
    """Records executions passing the channels websocket; refuses them in strict mode."""

    kernel_id: str
    kernel_manager: Any
    session: Any
    identity: Any
    log: Any
    request: Any
    selected_subprotocol: str | None

    def on_message(self, ws_msg: str | bytes) -> Awaitable[None] | None:
        message = parse_client_message(ws_msg, v1=self.selected_subprotocol == V1_PROTOCOL)
        # percent-encoded by gateway.client (header values are latin-1 only)
        path = unquote(self.request.headers.get(PATH_HEADER, ""))
        request = execution_of(message, notebook_path=path) if message else None
        if request is None:
            return super().on_message(ws_msg)  # type: ignore[misc]
        if message is not None and message.header.get("msg_type") == "execute_request":
            # notices to this client go under the cell it ran last (eviction_notice.py)
            self.kf_last_execute = dict(message.header)
        trail = self.kernel_manager.compliance.trail
        context = trail.context(self.kernel_id) or self._kf_adopt(trail)
        if trail.forwards_first(context):
            forwarded = super().on_message(ws_msg)  # type: ignore[misc]
            # recorded before any reply can be read (replies come on a later loop pass)
            trail.execution_forwarded(context, self.identity, request)
            return forwarded
        waiter = trail.execution_requested(context, self.identity, request)
        if waiter is None:
            return super().on_message(ws_msg)  # type: ignore[misc]
        return self._kf_forward_when_recorded(waiter, ws_msg, message)

    def _kf_adopt(self, trail: Any) -> Any:
        """A context for a kernel this gateway has no start record of (should not happen)."""
        km = self.kernel_manager
        name = km.get_kernel(self.kernel_id).kernel_name
        owner = km.owner_of(self.kernel_id) or self.identity.name
        self.log.warning(
            "Kernel %s has no audit context; recording it as %s's", self.kernel_id, owner
        )
        return trail.adopt(self.kernel_id, owner, kernel_name=name, spec=km._kernelspec_dict(name))

    async def _kf_forward_when_recorded(
        self, waiter: Awaitable[None], ws_msg: str | bytes, message: Any
    ) -> None:
        try:
            await waiter
        except AuditUnavailable as e:
            self.log.error("Refused an execution on kernel %s for %s: %s", self.kernel_id,
                           self.identity.name, e)  # fmt: skip
            self._kf_refuse(message, str(e))
            return
        super().on_message(ws_msg)  # type: ignore[misc]

    def _kf_refuse(self, message: ClientMessage, reason: str) -> None:
        text = (
            f"Execution refused: this kernel's executions must be audited, and {reason}. "
            "Your code did not run. Try again in a minute, or tell an admin."
        )
        error = {"ename": REFUSAL_ENAME, "evalue": text, "traceback": [text]}
        parent = dict(message.header)
        self._kf_send("iopub", "status", {"execution_state": "busy"}, parent)
        self._kf_send("iopub", "error", error, parent)
        reply = {"status": "error", "execution_count": None, **error}
        reply_type = "debug_reply" if parent.get("msg_type") == "debug_request" else "execute_reply"
        self._kf_send(message.channel, reply_type, reply, parent)
        self._kf_send("iopub", "status", {"execution_state": "idle"}, parent)

    def _kf_send(self, channel: str, msg_type: str, content: dict[str, Any], parent: Any) -> None:
        msg = self.session.msg(msg_type, content, parent=parent)
        pack = self.session.pack
        if self.selected_subprotocol == V1_PROTOCOL:
            parts = [pack(msg["header"]), pack(msg["parent_header"]), pack(msg["metadata"]),
                     pack(msg["content"])]  # fmt: skip
            self.write_message(encode_v1(channel, parts), binary=True)  # type: ignore[attr-defined]
        else:
            msg["channel"], msg["buffers"] = channel, []
            self.write_message(pack(msg).decode())  # type: ignore[attr-defined]

    def _on_zmq_reply(self, stream: Any, msg_list: list[Any]) -> None:
        if getattr(stream, "channel", None) in EXECUTING_CHANNELS:
            reply = reply_of(msg_list, self.session)
            if reply is not None:
                trail = self.kernel_manager.compliance.trail
                trail.execution_replied(self.kernel_id, *reply)
        super()._on_zmq_reply(stream, msg_list)  # type: ignore[misc]
