"""One open kernel connection per chain kind, with the same two operations.

- :class:`WebsocketKernel`: a channels websocket to a notebook server, directly or through
  the hub's proxy, offering JupyterLab 4's binary ``v1`` protocol (legacy JSON where the
  server picks none, as the stock gateway client does);
- :class:`ZmqKernel`: jupyter_client's AsyncKernelClient straight on the kernel's ZMQ
  sockets, no server at all (the raw baseline).

Both answer ``kernel_info()`` and ``execute(code)``; an execution counts as done when its
``execute_reply`` *and* its ``status: idle`` have arrived (all output is in by then).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, Protocol

from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager
from jupyter_server.services.kernels.connection.base import (
    deserialize_msg_from_ws_v1,
    serialize_msg_to_ws_v1,
)
from websockets.asyncio.client import ClientConnection
from websockets.typing import Subprotocol

from tests.support.kernel_ws import Execution, message

V1_PROTOCOL = Subprotocol("v1.kernel.websocket.jupyter.org")
V1_PARTS = ("header", "parent_header", "metadata", "content")


class Kernel(Protocol):
    """An open connection to one running kernel."""

    kernel_id: str

    async def kernel_info(self, *, timeout: float) -> dict[str, Any]:
        """Send kernel_info_request; the reply's content."""
        ...

    async def execute(self, code: str, *, timeout: float) -> Execution:
        """Run ``code``; its status and output once the kernel is idle again."""
        ...

    async def close(self) -> None:
        """Close the connection (the kernel keeps running)."""
        ...


class WebsocketKernel:
    """A kernel reached over a channels websocket, in whichever protocol the server chose.

    Connections offer ``v1.kernel.websocket.jupyter.org`` as JupyterLab 4 does; a server
    that answers without a subprotocol (the stock gateway client) speaks legacy JSON.
    """

    def __init__(self, ws: ClientConnection, kernel_id: str) -> None:
        self.ws = ws
        self.kernel_id = kernel_id
        self.session = uuid.uuid4().hex
        self.v1 = ws.subprotocol == V1_PROTOCOL

    async def _send(self, msg_type: str, content: dict[str, Any]) -> str:
        msg = message(msg_type, content, session=self.session)
        if self.v1:
            parts = [json.dumps(msg[key]).encode() for key in V1_PARTS]
            await self.ws.send(serialize_msg_to_ws_v1(parts, msg["channel"]))
        else:
            await self.ws.send(json.dumps(msg))
        return str(msg["header"]["msg_id"])

    async def _receive(self) -> dict[str, Any]:
        """The next message as a dict with channel, header, parent_header, msg_type, content."""
        frame = await self.ws.recv()
        if isinstance(frame, bytes) and self.v1:
            channel, parts = deserialize_msg_from_ws_v1(frame)
            header, parent, _metadata, content = (json.loads(part) for part in parts[:4])
            return {"channel": channel, "header": header, "parent_header": parent,
                    "msg_type": header["msg_type"], "content": content}  # fmt: skip
        return dict(json.loads(frame))

    async def kernel_info(self, *, timeout: float) -> dict[str, Any]:
        msg_id = await self._send("kernel_info_request", {})
        async with asyncio.timeout(timeout):
            while True:
                reply = await self._receive()
                if (reply["msg_type"] == "kernel_info_reply"
                        and reply["parent_header"].get("msg_id") == msg_id):  # fmt: skip
                    return dict(reply["content"])

    async def execute(self, code: str, *, timeout: float) -> Execution:
        msg_id = await self._send("execute_request", {
            "code": code, "silent": False, "store_history": True, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True})  # fmt: skip
        out = Execution()
        replied = idle = False
        async with asyncio.timeout(timeout):
            while not (replied and idle):
                msg = await self._receive()
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                if msg["channel"] == "shell" and msg["msg_type"] == "execute_reply":
                    out.status, replied = msg["content"]["status"], True
                elif msg["channel"] == "iopub":
                    idle = _collect(out, msg) or idle
        return out

    async def close(self) -> None:
        await self.ws.close()


class ZmqKernel:
    """A kernel reached on its ZMQ sockets by jupyter_client (no server in between)."""

    def __init__(self, manager: AsyncKernelManager, client: AsyncKernelClient) -> None:
        self.manager = manager
        self.client = client
        self.kernel_id = manager.kernel_id or "local"

    async def kernel_info(self, *, timeout: float) -> dict[str, Any]:
        msg_id = self.client.kernel_info()
        reply = await self._shell_reply(msg_id, timeout=timeout)
        return dict(reply["content"])

    async def execute(self, code: str, *, timeout: float) -> Execution:
        msg_id = self.client.execute(code, store_history=True)
        out = Execution()
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.client.get_iopub_msg()
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                if _collect(out, msg):
                    break
            reply = await self._shell_reply(msg_id, timeout=timeout)
        out.status = reply["content"]["status"]
        return out

    async def _shell_reply(self, msg_id: str, *, timeout: float) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                reply = await self.client.get_shell_msg()
                if reply["parent_header"].get("msg_id") == msg_id:
                    return dict(reply)

    async def close(self) -> None:
        self.client.stop_channels()


def _collect(out: Execution, msg: dict[str, Any]) -> bool:
    """Add one iopub message to ``out``; True when it is the final ``idle``."""
    kind, content = msg["msg_type"], msg["content"]
    out.iopub.append(msg)
    if kind == "stream":
        setattr(out, content["name"], getattr(out, content["name"]) + content["text"])
    elif kind == "execute_result":
        out.result = content["data"].get("text/plain")
    elif kind == "error":
        out.error = f"{content['ename']}: {content['evalue']}"
    return kind == "status" and content["execution_state"] == "idle"
