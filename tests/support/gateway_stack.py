"""One real Enterprise Gateway 3.3 process with gateway.server (from .venv-gateway), and the
stand-ins it talks to: JupyterHub's API and the scheduler (small threaded HTTP servers with
fixed answers; the e2e suite runs the real ones). Kernels are real ipykernels from .venv.

Also the module-scoped fixtures that start them (``hub_port``, ``scheduler_port``,
``gateway``, ``api``: a test module binds them to its own names to get one EG of its own)
and the kernel-protocol helpers the gateway tests share.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.support.ports import free_port
from tests.support.waiting import wait_for_gateway

REPO = Path(__file__).resolve().parents[2]

GATEWAY_PYTHON = REPO / ".venv-gateway" / "bin" / "python"

KERNEL_PYTHON = REPO / ".venv" / "bin" / "python"

LOCAL_PROXY = "enterprise_gateway.services.processproxies.processproxy.LocalProcessProxy"

ALICE, BOB, CAROL = "alice-token", "bob-token", "carol-token"

GATEWAY_SERVICE, OTHER_SERVICE = "gateway-service-token", "culler-token"

SCHEDULER_TOKEN = "scheduler-secret"

HUB_USERS: dict[str, dict[str, Any]] = {
    ALICE: {"kind": "user", "name": "alice", "admin": False, "groups": ["analysts", "ml"]},
    BOB: {"kind": "user", "name": "bob", "admin": False, "groups": ["analysts"]},
    CAROL: {"kind": "user", "name": "carol", "admin": True, "groups": []},
    GATEWAY_SERVICE: {"kind": "service", "name": "kernelfleet-gateway"},
    OTHER_SERVICE: {"kind": "service", "name": "idle-culler"},
}

# A kernel that takes 3 s to answer its first kernel_info_request.
SLOW_START = (
    "import time; time.sleep(3); from ipykernel.kernelapp import launch_new_instance; "
    "launch_new_instance()"
)

ENV_PROBE = (
    "import os; print(os.environ.get('KERNEL_USERNAME'), os.environ.get('KERNEL_IMAGE'), "
    "os.environ['HOME'], os.getcwd(), os.environ.get('CUDA_VISIBLE_DEVICES'))"
)


# -- stand-ins ---------------------------------------------------------------------------


class _JSONHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _answer(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class HubAPIStandIn(_JSONHandler):
    """Stand-in for JupyterHub's GET /hub/api/user: a fixed token → model table."""

    def do_GET(self) -> None:
        token = self.headers.get("Authorization", "").removeprefix("token ")
        if self.path != "/hub/api/user" or token not in HUB_USERS:
            self._answer(403, {"status": 403, "message": "Forbidden"})
        else:
            self._answer(200, HUB_USERS[token])


class SchedulerStandIn(_JSONHandler):
    """Stand-in for the scheduler: records admissions and releases; can refuse or vanish.

    ``refusals`` is a queue of ``(status, body)`` answers (``None`` drops the connection
    without answering); when empty, every admission is admitted, GPU ones with a device.
    ``start_failures``: kernelspec -> ``{reason, message}`` that ``GET
    /v1/start-failures/{kernel_id}`` answers for an admitted kernel of that kernelspec (the
    Kubernetes backend's record of a pod that did not start); 404 otherwise, as the
    scheduler answers without a record or without that backend.
    """

    admissions: list[dict[str, Any]] = []
    releases: list[str] = []
    refusals: list[tuple[int, dict[str, Any]] | None] = []
    start_failures: dict[str, dict[str, str]] = {}

    def do_GET(self) -> None:
        if not self._authorized():
            return
        kernel_id = self.path.removeprefix("/v1/start-failures/")
        specs = [a["kernelspec"] for a in self.admissions if a.get("kernel_id") == kernel_id]
        failure = self.start_failures.get(specs[-1]) if specs else None
        if not self.path.startswith("/v1/start-failures/") or failure is None:
            message = f"No start failure is recorded for kernel {kernel_id}."
            self._answer(404, {"error": "unknown_start_failure", "message": message})
            return
        self._answer(200, {"kernel_id": kernel_id, "kernelspec": specs[-1], **failure,
                           "at": "1763900000.0"})  # fmt: skip

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == f"token {SCHEDULER_TOKEN}":
            return True
        self._answer(401, {"error": "unauthorized", "message": "no token"})
        return False

    def do_POST(self) -> None:
        if not self._authorized():
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).admissions.append(body)
        if self.refusals:
            refusal = self.refusals.pop(0)
            if refusal is None:
                self.close_connection = True
                return
            self._answer(*refusal)
            return
        env = {"CUDA_VISIBLE_DEVICES": "1"} if body["kernelspec"] == "python-gpu" else {}
        self._answer(201, {"decision": "admitted", "lease": {}, "env": env})

    def do_DELETE(self) -> None:
        if self._authorized():
            type(self).releases.append(self.path.rsplit("/", 1)[-1])
            self._answer(200, {"released": True})


def serve_stand_in(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, int]:
    """Serve ``handler`` on a free loopback port in a daemon thread; the server, its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def _kernelspec(root: Path, name: str, curated: dict[str, Any] | None, argv: list[str]) -> None:
    folder = root / "kernels" / name
    folder.mkdir(parents=True)
    metadata: dict[str, Any] = {"process_proxy": {"class_name": LOCAL_PROXY}}
    if curated is not None:
        metadata["kernelfleet"] = {"name": name, "pool": "cpu", **curated}
    spec = {
        "argv": [*argv, "-f", "{connection_file}"],
        "display_name": name,
        "language": "python",
        "env": {},
        "metadata": metadata,
    }
    (folder / "kernel.json").write_text(json.dumps(spec))


class Gateway:
    """One EG process with kernelfleet's app; ``url``, ``home``, ``log`` for tests."""

    def __init__(
        self, tmp: Path, hub_port: int, scheduler_port: int, extra_config: str = ""
    ) -> None:
        self.tmp, self.port = tmp, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.home = tmp / "home"
        self.log = tmp / "gateway.log"
        share = tmp / "share"
        ipykernel = [str(KERNEL_PYTHON), "-m", "ipykernel_launcher"]
        _kernelspec(share, "python-cpu", {"groups": ["*"]}, ipykernel)
        _kernelspec(share, "python-gpu", {"groups": ["ml"]}, ipykernel)
        _kernelspec(share, "python-slow", {"groups": ["*"]}, [str(KERNEL_PYTHON), "-c", SLOW_START])
        _kernelspec(share, "broken", {"groups": ["*"]}, [str(tmp / "no-such-python")])
        _kernelspec(share, "plain", None, ipykernel)
        (tmp / "scheduler_token").write_text(SCHEDULER_TOKEN + "\n")
        (tmp / "gateway_service_token").write_text(GATEWAY_SERVICE + "\n")
        config = tmp / "gateway_config.py"
        config.write_text(
            f"c.KernelfleetGatewayApp.ip = '127.0.0.1'\n"
            f"c.KernelfleetGatewayApp.port = {self.port}\n"
            f"c.KernelfleetGatewayApp.port_retries = 0\n"
            f"c.KernelfleetGatewayApp.hub_api_url = 'http://127.0.0.1:{hub_port}/hub/api'\n"
            f"c.KernelfleetGatewayApp.scheduler_url = 'http://127.0.0.1:{scheduler_port}'\n"
            f"c.KernelfleetGatewayApp.scheduler_token_file = '{tmp / 'scheduler_token'}'\n"
            f"c.KernelfleetGatewayApp.admin_token_file = '{tmp / 'gateway_service_token'}'\n"
            f"c.KernelfleetGatewayApp.kernel_home_root = '{self.home}'\n"
            "c.KernelSpecManager.ensure_native_kernel = False\n"
            "c.KernelRestarter.restart_limit = 1\n"
            "c.KernelRestarter.time_to_dead = 0.5\n" + extra_config
        )
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "JUPYTER_PATH": str(share),
            "JUPYTER_CONFIG_DIR": str(tmp / "config"),
            "JUPYTER_DATA_DIR": str(tmp / "data"),
            "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
            "HOME": str(tmp),
        }
        command = [str(GATEWAY_PYTHON), "-m", "gateway.server", "--config", str(config)]
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        wait_for_gateway(self.url, self.process, self.log)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="module")
def hub_port() -> Iterator[int]:
    server, port = serve_stand_in(HubAPIStandIn)
    yield port
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def scheduler_port() -> Iterator[int]:
    server, port = serve_stand_in(SchedulerStandIn)
    yield port
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, hub_port: int, scheduler_port: int
) -> Iterator[Gateway]:
    gw = Gateway(tmp_path_factory.mktemp("gateway"), hub_port, scheduler_port)
    yield gw
    gw.stop()


@pytest.fixture
async def api(gateway: Gateway) -> Any:
    """``api(token)`` → an httpx client for the gateway as that token's owner."""
    clients: list[httpx.AsyncClient] = []

    def make(token: str | None) -> httpx.AsyncClient:
        headers = {"Authorization": f"token {token}"} if token else {}
        client = httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=30)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


# -- kernel protocol helpers --------------------------------------------------------------


async def start_kernel(client: httpx.AsyncClient, name: str = "python-cpu", **env: str) -> str:
    response = await client.post("/api/kernels", json={"name": name, "env": env})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def channels(
    gateway: Gateway, kernel_id: str, token: str, session: str, *, in_query: bool = False
) -> Any:
    url = f"ws://127.0.0.1:{gateway.port}/api/kernels/{kernel_id}/channels?session_id={session}"
    if in_query:
        return connect(f"{url}&token={token}", open_timeout=15)
    return connect(url, additional_headers={"Authorization": f"token {token}"}, open_timeout=15)


async def send_execute(ws: ClientConnection, code: str, session: str) -> str:
    """Send an execute_request for ``code`` with a fresh msg_id; return the msg_id."""
    msg_id = uuid.uuid4().hex
    header = {
        "msg_id": msg_id,
        "msg_type": "execute_request",
        "session": session,
        "username": "test",
        "version": "5.3",
        "date": datetime.now(timezone.utc).isoformat(),
    }
    content = {
        "code": code,
        "silent": False,
        "store_history": False,
        "user_expressions": {},
        "allow_stdin": False,
        "stop_on_error": True,
    }
    await ws.send(
        json.dumps(
            {
                "header": header,
                "parent_header": {},
                "metadata": {},
                "content": content,
                "channel": "shell",
                "buffers": [],
            }
        )
    )
    return msg_id


async def execute(ws: ClientConnection, code: str, session: str, timeout: float = 20) -> str:
    """Run ``code``; return its stdout."""
    return await output_of(ws, await send_execute(ws, code, session), timeout)


async def output_of(ws: ClientConnection, msg_id: str, timeout: float = 20) -> str:
    """The stdout of request ``msg_id`` as ``ws`` receives it, up to the kernel's idle."""
    out: list[str] = []
    async with asyncio.timeout(timeout):
        while True:
            msg = json.loads(await ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["header"]["msg_type"]
            if kind == "stream":
                out.append(msg["content"]["text"])
            elif kind == "error":
                raise AssertionError(f"kernel error: {msg['content']['evalue']}")
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                return "".join(out)


async def wait_for(predicate: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)
