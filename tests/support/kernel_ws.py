"""Talk to a kernel over the Jupyter websocket protocol (legacy JSON frames).

Every message gets a fresh msg_id: a jupyter_client Session rejects a signature it has
seen before ("Duplicate Signature").
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import websockets


def message(msg_type: str, content: dict[str, Any], *, session: str) -> dict[str, Any]:
    """A shell-channel message in the websocket JSON shape."""
    return {
        "header": {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "username": "test",
            "session": session,
            "version": "5.3",
            "date": "",
        },
        "parent_header": {},
        "metadata": {},
        "content": content,
        "channel": "shell",
        "buffers": [],
    }


@dataclass
class Execution:
    """What one execute_request produced."""

    status: str = ""
    stdout: str = ""
    stderr: str = ""
    result: str | None = None
    error: str | None = None
    iopub: list[dict[str, Any]] = field(default_factory=list)


async def execute(
    ws: websockets.ClientConnection, code: str, *, session: str, timeout: float = 30
) -> Execution:
    """Run code on an open channels websocket and collect its output until idle."""
    request = message(
        "execute_request",
        {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
        session=session,
    )
    msg_id = request["header"]["msg_id"]
    await ws.send(json.dumps(request))
    out = Execution()
    got_reply = got_idle = False

    async def collect() -> None:
        nonlocal got_reply, got_idle
        while not (got_reply and got_idle):
            msg = json.loads(await ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if msg["channel"] == "shell" and kind == "execute_reply":
                out.status, got_reply = content["status"], True
            elif kind == "stream":
                setattr(out, content["name"], getattr(out, content["name"]) + content["text"])
            elif kind == "execute_result":
                out.result = content["data"].get("text/plain")
            elif kind == "error":
                out.error = f"{content['ename']}: {content['evalue']}"
            elif kind == "status" and content["execution_state"] == "idle":
                got_idle = True
            if msg["channel"] == "iopub":
                out.iopub.append(msg)

    await asyncio.wait_for(collect(), timeout)
    return out
