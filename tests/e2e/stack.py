"""The whole platform, started once per test run with `kernelfleet up`, and a browser-like
client for it (login form, cookies, xsrf), so e2e tests use the stack as people do.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import websockets
import yaml

from tests.support.ports import free_ports

REPO = Path(__file__).resolve().parents[2]
READY_LINE = "kernelfleet is up"


@dataclass
class Stack:
    """A running platform: where it listens and who may log in."""

    config_path: Path
    state_dir: Path
    host: str
    ports: dict[str, int]
    logins: dict[str, str]
    process: subprocess.Popen[str]
    output: list[str]

    @property
    def hub_url(self) -> str:
        return f"http://{self.host}:{self.ports['hub']}"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.host}:{self.ports['gateway']}"

    @property
    def scheduler_url(self) -> str:
        return f"http://{self.host}:{self.ports['scheduler']}"

    def secret(self, name: str) -> str:
        return (self.state_dir / "secrets" / name).read_text().strip()

    def log_path(self, component: str) -> Path:
        return self.state_dir / "logs" / f"{component}.log"

    def log(self, component: str) -> str:
        return self.log_path(component).read_text(errors="replace")


def write_test_config(tmp: Path, **overrides: Any) -> Path:
    """The repo's kernelfleet.yaml with free ports and a private state dir."""
    raw = yaml.safe_load((REPO / "kernelfleet.yaml").read_text())
    raw["ports"] = dict(zip(raw["ports"], free_ports(len(raw["ports"])), strict=True))
    raw["state_dir"] = str(tmp / "state")
    raw["kernelspecs_dir"] = str(REPO / "kernelspecs")
    raw["kernel_python"] = str(REPO / ".venv-kernel" / "bin" / "python")
    raw.update(overrides)
    path = tmp / "kernelfleet.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start_stack(config_path: Path, *, timeout: float = 240) -> Stack:
    """Run `kernelfleet up` and wait for its ready line (or fail with its output)."""
    raw = yaml.safe_load(config_path.read_text())
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kernelfleet.cli",
            "--config",
            str(config_path),
            "up",
            "--skip-install",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    output: list[str] = []
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        output.append(line)
        if line.startswith(READY_LINE):
            break
    else:
        stop_stack_process(process)
        raise RuntimeError("kernelfleet up timed out:\n" + "".join(output))
    if not output or not output[-1].startswith(READY_LINE):
        stop_stack_process(process)
        raise RuntimeError("kernelfleet up failed:\n" + "".join(output))
    state_dir = Path(raw["state_dir"])
    logins = dict(
        line.split(" ", 1) for line in (state_dir / "demo-logins.txt").read_text().splitlines()
    )
    return Stack(
        config_path, state_dir, raw.get("host", "127.0.0.1"), raw["ports"], logins, process, output
    )


def stop_stack_process(process: subprocess.Popen[str], timeout: float = 30) -> None:
    """SIGTERM `kernelfleet up` (it stops what it started); SIGKILL if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class HubUser:
    """One person's browser session: hub cookies, xsrf, their notebook server's API."""

    def __init__(self, stack: Stack, name: str) -> None:
        self.stack, self.name = stack, name
        self.http = httpx.AsyncClient(base_url=stack.hub_url, timeout=60)

    async def close(self) -> None:
        await self.http.aclose()

    async def login(self, password: str | None = None) -> httpx.Response:
        """Submit the login form as a browser does; returns the final response."""
        page = await self.http.get("/hub/login")
        xsrf = self.http.cookies.get("_xsrf", path="/hub/")
        return (
            await self.http.post(
                "/hub/login",
                data={
                    "username": self.name,
                    "password": password or self.stack.logins[self.name],
                    "_xsrf": xsrf or "",
                },
                follow_redirects=True,
            )
            if page.status_code == 200
            else page
        )

    @property
    def server(self) -> str:
        return f"/user/{self.name}"

    async def start_server(self, timeout: float = 90) -> None:
        """Spawn the user's notebook server and open JupyterLab as a browser does: the page
        load runs the OAuth dance that gives this session the server's cookies (and _xsrf)."""
        await self.http.get(f"/hub/spawn/{self.name}", follow_redirects=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            page = await self.http.get(f"{self.server}/lab", follow_redirects=True)
            if page.status_code == 200 and page.url.path.startswith(f"{self.server}/lab"):
                return
            await _sleep(0.5)
        raise AssertionError(f"{self.name}'s server did not start: {page.status_code} {page.url}")

    def _xsrf_headers(self) -> dict[str, str]:
        token = None
        for cookie in self.http.cookies.jar:
            if cookie.name == "_xsrf" and cookie.path.startswith(self.server):
                token = cookie.value
        return {"X-XSRFToken": token} if token else {}

    async def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Call the user's notebook server API (as JupyterLab does)."""
        return await self.http.request(
            method, f"{self.server}/api{path}", headers=self._xsrf_headers(), **kwargs
        )

    async def shutdown_kernels(self) -> None:
        """Shut down every kernel this user has (tests share one stack)."""
        for kernel in (await self.api("GET", "/kernels")).json():
            await self.api("DELETE", f"/kernels/{kernel['id']}")

    async def start_kernel(self, name: str) -> httpx.Response:
        return await self.api("POST", "/kernels", json={"name": name})

    def channels(self, kernel_id: str, **kwargs: Any) -> websockets.connect:
        """A channels websocket to one kernel through hub proxy and notebook server;
        ``kwargs`` go to ``websockets.connect`` (e.g. ``subprotocols``)."""
        session = uuid.uuid4().hex
        url = (
            f"ws://{self.stack.host}:{self.stack.ports['hub']}{self.server}"
            f"/api/kernels/{kernel_id}/channels?session_id={session}"
        )
        cookie = "; ".join(f"{c.name}={c.value}" for c in self.http.cookies.jar)
        options: dict[str, Any] = {"max_size": None, "open_timeout": 60, **kwargs}
        return websockets.connect(url, additional_headers={"Cookie": cookie}, **options)

    async def hub_token(self) -> str:
        """A personal hub API token, as a user makes one on the token page."""
        xsrf = self.http.cookies.get("_xsrf", path="/hub/")
        response = await self.http.post(
            f"/hub/api/users/{self.name}/tokens",
            json={"note": "e2e"},
            headers={"X-XSRFToken": xsrf or ""},
        )
        response.raise_for_status()
        return str(response.json()["token"])


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
