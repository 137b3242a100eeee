"""A small kernelfleet for compliance tests: real scheduler and EG, a hub stand-in.

:func:`running_platform` renders kernelspecs from spec.yaml with kernelfleet's own build,
starts the real scheduler (``python -m scheduler``) on a given Redis and a real Enterprise
Gateway (``python -m gateway.server``, DEBUG logging, ``file`` secrets provider) behind a
JupyterHub API stand-in (a fixed token → user table). :class:`Channels` talks to kernels
in the legacy JSON protocol or in ``v1.kernel.websocket.jupyter.org`` binary frames.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import redis
import yaml
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from gateway.server.audit_channels import V1_PROTOCOL, encode_v1
from gateway.server.audit_format import read_records
from kernelfleet.config import load_config
from kernelfleet.kernelspecs.render import build_local
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_for_gateway

REPO = Path(__file__).resolve().parents[2]
GATEWAY_PYTHON = REPO / ".venv-gateway" / "bin" / "python"

USERS = {
    "alice-token": {"kind": "user", "name": "alice", "admin": False, "groups": ["analysts"]},
    "bob-token": {"kind": "user", "name": "bob", "admin": False, "groups": ["ml"]},
    "carol-token": {"kind": "user", "name": "carol", "admin": False, "groups": ["finance"]},
}
SECRETS = {
    "kv/data/teams/analysts/warehouse": {"password": "pw-analysts-" + uuid.uuid4().hex[:10]},
    "kv/data/teams/ml/warehouse": {"password": "pw-ml-" + uuid.uuid4().hex[:10]},
    "kv/data/users/alice/api": {"token": "tok-alice-" + uuid.uuid4().hex[:10]},
}
ANALYSTS_PW = SECRETS["kv/data/teams/analysts/warehouse"]["password"]
ML_PW = SECRETS["kv/data/teams/ml/warehouse"]["password"]
ALICE_TOKEN = SECRETS["kv/data/users/alice/api"]["token"]
ALL_VALUES = (ANALYSTS_PW, ML_PW, ALICE_TOKEN)
SPECS: dict[str, dict[str, Any]] = {
    "python-cpu": {"display_name": "CPU", "pool": "cpu", "groups": ["*"]},
    "warehouse": {
        "display_name": "Warehouse", "pool": "cpu", "groups": ["analysts", "ml", "finance"],
        "secrets": [
            {"vault": "kv/data/teams/{group}/warehouse", "env": {"WAREHOUSE_PASSWORD": "password"}},
            {"vault": "kv/data/users/{user}/api", "env": "API_TOKEN", "key": "token",
             "optional": True},
        ],
    },
    "python-strict": {"display_name": "Strict", "pool": "cpu", "groups": ["*"],
                      "audit": {"strict": True}},
}  # fmt: skip
ENV_PROBE = "import os; print(os.environ.get('WAREHOUSE_PASSWORD'), os.environ.get('API_TOKEN'))"


class HubStandIn(BaseHTTPRequestHandler):
    """Stand-in for JupyterHub's GET /hub/api/user (token → user model)."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def do_GET(self) -> None:
        model = USERS.get(self.headers.get("Authorization", "").removeprefix("token "))
        data = json.dumps(model or {"message": "Forbidden"}).encode()
        self.send_response(200 if model else 403)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@dataclass
class Platform:
    """The scheduler, the gateway, and where their files are."""

    tmp: Path
    url: str
    audit: Path
    secrets_file: Path
    gateway_log: Path
    scheduler_log: Path
    redis: RedisServer
    homes: Path

    def ws_url(self, kernel_id: str) -> str:
        return f"{self.url.replace('http', 'ws')}/api/kernels/{kernel_id}/channels"

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        return [r for r in read_records(self.audit) if event is None or r["event"] == event]


def _write_project(tmp: Path, scheduler_port: int, redis_port: int) -> Path:
    for name, spec in SPECS.items():
        (tmp / "kernelspecs" / name).mkdir(parents=True)
        (tmp / "kernelspecs" / name / "spec.yaml").write_text(yaml.safe_dump(spec))
    config = {
        "host": "127.0.0.1", "state_dir": "state", "kernelspecs_dir": "kernelspecs",
        "kernel_python": str(REPO / ".venv" / "bin" / "python"),
        "ports": {"scheduler": scheduler_port, "redis": redis_port},
        "pools": {"cpu": {"cpus": 64, "memory": "256Gi"}},
        "quotas": {"default": {"kernels": 20}},
    }  # fmt: skip
    path = tmp / "kernelfleet.yaml"
    path.write_text(yaml.safe_dump(config))
    secrets_dir = tmp / "state" / "secrets"
    secrets_dir.mkdir(parents=True)
    (secrets_dir / "scheduler_token").write_text(uuid.uuid4().hex + "\n")
    secrets_file = tmp / "state" / "secrets.yaml"
    secrets_file.write_text(yaml.safe_dump(SECRETS))
    secrets_file.chmod(0o600)
    return path


def _wait_for_line(process: subprocess.Popen[str], prefix: str, log: Path) -> None:
    assert process.stdout is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith(prefix):
            return
        if not line and process.poll() is not None:
            break
    raise RuntimeError(f"did not start:\n{log.read_text()[-3000:]}")


def _gateway_config(tmp: Path, port: int, hub_port: int, scheduler_port: int) -> Path:
    state = tmp / "state"
    path = tmp / "gateway_config.py"
    path.write_text(
        f"c.KernelfleetGatewayApp.ip = '127.0.0.1'\n"
        f"c.KernelfleetGatewayApp.port = {port}\n"
        f"c.KernelfleetGatewayApp.port_retries = 0\n"
        f"c.KernelfleetGatewayApp.log_level = 'DEBUG'\n"
        f"c.KernelfleetGatewayApp.hub_api_url = 'http://127.0.0.1:{hub_port}/hub/api'\n"
        f"c.KernelfleetGatewayApp.scheduler_url = 'http://127.0.0.1:{scheduler_port}'\n"
        f"c.KernelfleetGatewayApp.scheduler_token_file = '{state / 'secrets/scheduler_token'}'\n"
        f"c.KernelfleetGatewayApp.kernel_home_root = '{state / 'home'}'\n"
        f"c.KernelfleetGatewayApp.audit_log_path = '{state / 'audit' / 'audit.jsonl'}'\n"
        f"c.KernelfleetGatewayApp.audit_strict_timeout = 2.0\n"
        f"c.KernelfleetGatewayApp.secrets_file = '{state / 'secrets.yaml'}'\n"
        "c.KernelSpecManager.ensure_native_kernel = False\n"
    )
    return path


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def running_platform(tmp: Path, redis_server: RedisServer) -> Iterator[Platform]:
    """The real scheduler (on ``redis_server``) and a gateway at DEBUG level, in ``tmp``."""
    scheduler_port, gateway_port = free_port(), free_port()
    config = _write_project(tmp, scheduler_port, redis_server.port)
    kernels = build_local(load_config(config))
    hub = ThreadingHTTPServer(("127.0.0.1", 0), HubStandIn)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    scheduler_log, gateway_log = tmp / "scheduler.log", tmp / "gateway.log"
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "scheduler", "--config", str(config)], cwd=REPO,
        stdout=subprocess.PIPE, stderr=scheduler_log.open("w"), text=True,
    )  # fmt: skip
    processes = [scheduler]
    try:
        _wait_for_line(scheduler, "scheduler ready on", scheduler_log)
        gateway_config = _gateway_config(tmp, gateway_port, hub.server_address[1], scheduler_port)
        env = {"PATH": os.environ.get("PATH", ""), "JUPYTER_PATH": str(kernels),
               "JUPYTER_CONFIG_DIR": str(tmp / "jconfig"), "JUPYTER_DATA_DIR": str(tmp / "jdata"),
               "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"), "HOME": str(tmp)}  # fmt: skip
        gateway = subprocess.Popen(
            [str(GATEWAY_PYTHON), "-m", "gateway.server", "--config", str(gateway_config)],
            cwd=REPO, env=env, stdout=gateway_log.open("w"), stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        processes.append(gateway)
        url = f"http://127.0.0.1:{gateway_port}"
        wait_for_gateway(url, gateway, gateway_log)
        state = tmp / "state"
        yield Platform(tmp, url, state / "audit" / "audit.jsonl", state / "secrets.yaml",
                       gateway_log, scheduler_log, redis_server, state / "home")  # fmt: skip
    finally:
        for process in reversed(processes):
            _stop(process)
        if scheduler.stdout is not None:
            scheduler.stdout.close()
        hub.shutdown()
        hub.server_close()


# -- talking to kernels ----------------------------------------------------------------------


class Channels:
    """One channels websocket, speaking the legacy JSON protocol or v1 binary frames."""

    def __init__(self, ws: ClientConnection, *, v1: bool) -> None:
        self.ws, self.v1, self.session = ws, v1, uuid.uuid4().hex

    async def send(self, code: str) -> str:
        header = {"msg_id": uuid.uuid4().hex, "msg_type": "execute_request", "username": "u",
                  "session": self.session, "version": "5.3", "date": ""}  # fmt: skip
        content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                   "allow_stdin": False, "stop_on_error": True}  # fmt: skip
        message = {"header": header, "parent_header": {}, "metadata": {"cellId": "cell-1"},
                   "content": content}  # fmt: skip
        if self.v1:
            parts = [json.dumps(message[k]).encode() for k in
                     ("header", "parent_header", "metadata", "content")]  # fmt: skip
            await self.ws.send(encode_v1("shell", parts))
        else:
            await self.ws.send(json.dumps({**message, "channel": "shell", "buffers": []}))
        return str(header["msg_id"])

    def _decode(self, frame: str | bytes) -> dict[str, Any]:
        if isinstance(frame, str):
            return dict(json.loads(frame))
        count = int.from_bytes(frame[:8], "little")
        offsets = [int.from_bytes(frame[8 * (i + 1) : 8 * (i + 2)], "little") for i in range(count)]
        parts = [frame[offsets[i] : offsets[i + 1]] for i in range(count - 1)]
        keys = ("header", "parent_header", "metadata", "content")
        return {
            "channel": parts[0].decode(),
            **{k: json.loads(p) for k, p in zip(keys, parts[1:5], strict=True)},
        }

    async def run(self, code: str) -> dict[str, Any]:
        """Run ``code``; its reply content, stdout and error (evalue) until idle."""
        msg_id = await self.send(code)
        out: dict[str, Any] = {"stdout": "", "reply": None, "error": None}
        idle = False
        async with asyncio.timeout(30):
            while out["reply"] is None or not idle:
                msg = self._decode(await self.ws.recv())
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                kind, content = msg["header"]["msg_type"], msg["content"]
                if kind == "execute_reply":
                    out["reply"] = content
                elif kind == "stream":
                    out["stdout"] += content["text"]
                elif kind == "error":
                    out["error"] = content["evalue"]
                elif kind == "status" and content["execution_state"] == "idle":
                    idle = True
        return out


def channels(platform: Platform, kernel_id: str, user: str, *, v1: bool = False,
             notebook: str = "") -> Any:  # fmt: skip
    headers = {"Authorization": f"token {user}-token"}
    if notebook:
        headers["X-Kernelfleet-Notebook-Path"] = notebook
    return connect(
        platform.ws_url(kernel_id),
        additional_headers=headers,
        open_timeout=20,
        subprotocols=[Subprotocol(V1_PROTOCOL)] if v1 else None,
    )


async def start(client: httpx.AsyncClient, name: str) -> str:
    response = await client.post("/api/kernels", json={"name": name})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def flushed(platform: Platform) -> None:
    """Wait until the gateway wrote every record it accepted (its buffer depth is 0)."""
    async with httpx.AsyncClient(base_url=platform.url) as client:
        for _ in range(100):
            if metric((await client.get("/metrics")).text, "kernelfleet_audit_buffer_depth") == 0:
                return
            await asyncio.sleep(0.05)
    raise AssertionError("the audit buffer did not drain")


async def run_on(platform: Platform, kernel_id: str, user: str, code: str) -> dict[str, Any]:
    async with channels(platform, kernel_id, user) as ws:
        return await Channels(ws, v1=False).run(code)


def redis_dump(client: redis.Redis) -> str:
    """Every key and value in Redis, as text."""
    readers = {
        "string": lambda key: client.get(key),
        "hash": lambda key: client.hgetall(key),
        "list": lambda key: client.lrange(key, 0, -1),
        "set": lambda key: client.smembers(key),
        "zset": lambda key: client.zrange(key, 0, -1, withscores=True),
        "stream": lambda key: client.xrange(key),
    }
    parts = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        read = readers.get(kind.decode() if isinstance(kind, bytes) else kind, lambda key: b"")
        parts.append(f"{key!r} {read(key)!r}")
    return "\n".join(parts)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")
