"""The "stock" JupyterHub the users phase compares kernelfleet's hub with.

Stock here means: the same JupyterHub 6.1.1 and configurable-http-proxy binary, with
JupyterHub's own ``SimpleLocalProcessSpawner`` starting the same ``jupyterhub-singleuser``
(JupyterLab 4, jupyter-server 2) *without* the gateway.client extension, so kernels are
local processes of the notebook server, from the same ipykernel interpreter as
kernelfleet's. The spawner gets kernelfleet's timeouts (``http_timeout``
:data:`hub.spawner.SERVER_HTTP_TIMEOUT_S`, ``start_timeout`` 60 s), so both hubs give a slow
server the same time. Login uses
JupyterHub's ``DummyAuthenticator`` (one shared password): kernelfleet's authenticator also
checks a PBKDF2 hash (~0.3 s of CPU per login by design), so logins are reported apart.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from hub.spawner import SERVER_HTTP_TIMEOUT_S
from tests.e2e.stack import Stack
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[1]
CHP = REPO / ".kernelfleet" / "node" / "node_modules" / ".bin" / "configurable-http-proxy"
START_TIMEOUT_S = 90.0

CONFIG = """# Written by bench/stock_hub.py: a stock JupyterHub for comparison.
c = get_config()  # noqa: F821
c.JupyterHub.bind_url = "http://127.0.0.1:{hub}"
c.JupyterHub.hub_bind_url = "http://127.0.0.1:{hub_api}"
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api}"
c.ConfigurableHTTPProxy.command = [{chp!r}]
c.JupyterHub.db_url = "sqlite:///{state}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{state}/cookie_secret"
c.JupyterHub.pid_file = "{state}/jupyterhub.pid"
c.ConfigurableHTTPProxy.pid_file = "{state}/proxy.pid"
c.JupyterHub.cleanup_servers = True
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = {password!r}
c.Authenticator.allowed_users = {users!r}
c.JupyterHub.spawner_class = "simple"
c.Spawner.cmd = [{singleuser!r}]
c.Spawner.args = {args!r}
c.Spawner.default_url = "/lab"
c.Spawner.http_timeout = {http_timeout}
c.Spawner.start_timeout = 60
c.Spawner.environment = {{"JUPYTER_PATH": {jupyter_path!r}}}
c.SimpleLocalProcessSpawner.home_dir_template = "{state}/home/{{username}}"
"""


def write_config(folder: Path, *, users: list[str], jupyter_path: Path) -> tuple[Path, Stack]:
    """The stock hub's config file, and a :class:`Stack` describing where it will listen."""
    state = folder / "state"
    (state / "home").mkdir(parents=True, exist_ok=True)
    ports = {"hub": free_port(), "hub_api": free_port(), "proxy_api": free_port()}
    password = secrets.token_urlsafe(12)
    args = ["--allow-root"] if os.geteuid() == 0 else []
    text = CONFIG.format(
        **ports,
        chp=str(CHP),
        state=state,
        password=password,
        users=set(users),
        args=args,
        jupyter_path=str(jupyter_path),
        http_timeout=SERVER_HTTP_TIMEOUT_S,
        singleuser=str(Path(sys.executable).parent / "jupyterhub-singleuser"),
    )
    config = folder / "jupyterhub_config.py"
    config.write_text(text)
    logins = {user: password for user in users}
    stack = Stack(config, state, "127.0.0.1", ports, logins, None, [])  # type: ignore[arg-type]
    return config, stack


def hub_log_path(folder: Path) -> Path:
    """Where the stock hub started in ``folder`` writes its log."""
    return folder / "hub.log"


@asynccontextmanager
async def running_stock_hub(folder: Path, *, users: list[str], jupyter_path: Path
                            ) -> AsyncIterator[Stack]:  # fmt: skip
    """A started stock hub (see the module docstring), stopped with its servers on exit."""
    config, stack = write_config(folder, users=users, jupyter_path=jupyter_path)
    log = hub_log_path(folder).open("wb")
    env = {**os.environ, "CONFIGPROXY_AUTH_TOKEN": secrets.token_hex(32)}
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "jupyterhub"), "-f", str(config)],
        cwd=stack.state_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    stack.process = process  # type: ignore[assignment]
    try:
        await _wait_ready(stack, process, hub_log_path(folder))
        yield stack
    finally:
        _stop(process)
        log.close()


async def _wait_ready(stack: Stack, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if (await http.get(f"{stack.hub_url}/hub/login")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("the stock hub did not start:\n" + log.read_text(errors="replace")[-3000:])


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the hub stops its servers and proxy), SIGKILL after 30 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
