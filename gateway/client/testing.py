"""Run a stock Enterprise Gateway and a notebook server with ``gateway.client``, for tests.

Used by the integration and browser tests (and usable by bench/ to compare with the stock
chain): each helper starts a real process on a free port, waits until it answers, and
returns a `ServerProcess` whose ``stop()`` ends it. Only the standard library is used, so
importing this module costs nothing in production.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

LOCAL_PROCESS_PROXY = "enterprise_gateway.services.processproxies.processproxy.LocalProcessProxy"


@dataclass
class ServerProcess:
    """A server started by this module: where it listens, its process and its log."""

    name: str
    url: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the server's log, for failure messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the server (it shuts its kernels down), SIGKILL it if it lingers."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_kernelspec(
    jupyter_path: Path,
    name: str,
    *,
    python: str = sys.executable,
    display_name: str | None = None,
    proxy_config: Mapping[str, str] | None = None,
) -> Path:
    """Write ``<jupyter_path>/kernels/<name>/kernel.json`` for EG's LocalProcessProxy.

    ``python`` must have ipykernel; ``proxy_config`` becomes
    ``metadata.process_proxy.config`` (e.g. ``{"authorized_users": "alice"}``).
    """
    process_proxy: dict[str, object] = {"class_name": LOCAL_PROCESS_PROXY}
    if proxy_config:
        process_proxy["config"] = dict(proxy_config)
    spec = {
        "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": display_name or name,
        "language": "python",
        "metadata": {"process_proxy": process_proxy},
    }
    folder = jupyter_path / "kernels" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kernel.json").write_text(json.dumps(spec, indent=1))
    return folder


def _isolated_env(workdir: Path, extra: Mapping[str, str] | None) -> dict[str, str]:
    """The environment for a child server: Jupyter dirs inside ``workdir``, no stray tokens."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "EG_", "KERNEL_"))}
    env.pop("JUPYTERHUB_API_TOKEN", None)
    env.update(
        JUPYTER_CONFIG_DIR=str(workdir / "config"),
        JUPYTER_DATA_DIR=str(workdir / "data"),
        JUPYTER_RUNTIME_DIR=str(workdir / "runtime"),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def _launch(
    name: str, argv: Sequence[str], *, workdir: Path, env: Mapping[str, str], url: str
) -> ServerProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(  # noqa: S603 (fixed argv built by this module)
            list(argv),
            cwd=workdir,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return ServerProcess(name=name, url=url, popen=popen, log_path=log_path)


def wait_until_ready(
    server: ServerProcess, path: str, *, token: str | None = None, timeout: float = 60.0
) -> None:
    """Poll ``GET <url><path>`` until it answers 200; stop the server and raise if it cannot."""
    headers = {"Authorization": f"token {token}"} if token else {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.popen.poll() is not None:
            break
        request = urllib.request.Request(server.url + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"{server.name} did not start:\n{server.log_tail()}")


def start_enterprise_gateway(
    workdir: Path,
    *,
    executable: Path,
    jupyter_path: Path,
    auth_token: str | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = 60.0,
) -> ServerProcess:
    """Start stock EG (``executable`` is its ``jupyter-enterprisegateway``) on a free port.

    Kernelspecs come from ``jupyter_path``; ``auth_token`` (passed through ``EG_AUTH_TOKEN``,
    never argv) makes EG demand ``Authorization: token <auth_token>``.
    """
    port = free_port()
    argv = [
        str(executable),
        "--ip=127.0.0.1",
        f"--port={port}",
        "--EnterpriseGatewayApp.list_kernels=True",
        *extra_args,
    ]
    env = _isolated_env(workdir, {"JUPYTER_PATH": str(jupyter_path)})
    if auth_token:
        env["EG_AUTH_TOKEN"] = auth_token
    server = _launch("gateway", argv, workdir=workdir, env=env, url=f"http://127.0.0.1:{port}")
    wait_until_ready(server, "/api/kernelspecs", token=auth_token, timeout=timeout)
    return server


def start_notebook_server(
    workdir: Path,
    *,
    gateway_url: str,
    token: str,
    root_dir: Path,
    env: Mapping[str, str] | None = None,
    app: str = "jupyter_server",
    use_extension: bool = True,
    args: Sequence[str] = (),
    timeout: float = 60.0,
) -> ServerProcess:
    """Start a notebook server (``app``: jupyter_server or jupyterlab) using the gateway.

    Configured the way the hub spawner does it (docs/contracts.md): ``JUPYTER_GATEWAY_URL``
    and ``JUPYTER_GATEWAY_AUTH_SCHEME=token`` in the environment, plus the
    ``gateway.client`` extension unless ``use_extension`` is False (the stock chain).
    ``token`` is the browser's login token (``JUPYTER_TOKEN``); ``env`` adds variables such
    as ``JUPYTERHUB_API_TOKEN`` or ``KERNEL_USERNAME``; ``args``, command-line options.
    """
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        app,
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        "--ServerApp.open_browser=False",
        "--ServerApp.allow_root=True",
        f"--ServerApp.root_dir={root_dir}",
    ]
    if use_extension:
        argv.append("--ServerApp.jpserver_extensions={'gateway.client': True}")
    argv += args
    child_env = _isolated_env(workdir, env)
    child_env.update(
        JUPYTER_TOKEN=token,
        JUPYTER_GATEWAY_URL=gateway_url,
        JUPYTER_GATEWAY_AUTH_SCHEME="token",
    )
    url = f"http://127.0.0.1:{port}"
    server = _launch("notebook", argv, workdir=workdir, env=child_env, url=url)
    wait_until_ready(server, "/api/status", token=token, timeout=timeout)
    return server
