"""The embedded default's spawner: a lightweight, gateway-backed notebook server per user.

Every user's server runs as the OS user who ran `make up` (there is no per-user OS
account in the embedded default), with its own home under ``<state_dir>/home/<user>``.
The server only serves JupyterLab and files: every kernel goes to the gateway, which
resolves the server's hub API token to the user. Terminals and per-user Jupyter config
files are off, so a user cannot run code on the hub's host through their server.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from jupyterhub.spawner import SimpleLocalProcessSpawner
from traitlets import Float, Integer, List, Unicode, default, validate

from .ports import SERVER_PORTS, above_ephemeral_range, parse_range

#: The server extension (gateway/client) that talks to the gateway from the notebook server.
GATEWAY_CLIENT_EXTENSION = "gateway.client"
#: Default seconds a spawned server may take to answer (Spawner.http_timeout).
SERVER_HTTP_TIMEOUT_S = 300


class KernelfleetSpawner(SimpleLocalProcessSpawner):
    """Starts ``jupyterhub-singleuser`` from this venv with the gateway client configured.

    Overrides ``get_env`` (gateway URL, auth and timeouts), ``get_args`` (lightweight,
    gateway-backed server) and ``start`` (creates the home folder, mode 0700, and picks the
    server's port from :attr:`server_port_range`).
    """

    _picked_port = 0  # the port start() picked last (0: none), told apart from a configured one

    home_root = Unicode(
        "",
        help="""Folder holding one home folder per user (<home_root>/<username>, mode 0700).

        Set to <state_dir>/home by hub.config.configure.
        """,
    ).tag(config=True)

    gateway_url = Unicode(
        "http://127.0.0.1:8888",
        help="URL of the kernel gateway (EG + gateway.server), as the notebook server sees it.",
    ).tag(config=True)

    kernel_launch_timeout = Integer(
        60,
        help="""Seconds the gateway may take to launch a kernel (KERNEL_LAUNCH_TIMEOUT).

        Set from kernelfleet.yaml's kernel_launch_timeout.
        """,
    ).tag(config=True)

    gateway_request_margin = Float(
        30.0,
        help="""Seconds added to kernel_launch_timeout for the notebook server's gateway request
        timeout, so a slow but successful launch is not cut off by the HTTP client first.
        Raise it if kernels queue for a busy pool for long.
        """,
    ).tag(config=True)

    server_port_range = Unicode(
        help="""Ports for users' servers, as lo..hi; 0..0: any free port (stock JupyterHub's
        way). Default: the ports above the system's ephemeral range (61000..65535 on Linux's
        default), where no outgoing connection or kernel socket can take a server's port
        between the hub picking it and the server binding it (hub/ports.py). Ignored when
        Spawner.port is set.
        """,
    ).tag(config=True)

    @default("server_port_range")
    def _default_server_port_range(self) -> str:
        found = above_ephemeral_range()
        return f"{found[0]}..{found[1]}" if found else "0..0"

    @validate("server_port_range")
    def _validate_server_port_range(self, proposal: Any) -> str:
        try:
            parse_range(str(proposal.value))
        except ValueError as e:
            raise ValueError(f"KernelfleetSpawner.server_port_range: {e}") from None
        return str(proposal.value)

    server_args = List(
        Unicode(),
        help="""Extra command-line arguments that keep the notebook server lightweight.

        Appended after JupyterHub's own arguments (and Spawner.args).
        """,
    ).tag(config=True)

    @default("server_args")
    def _default_server_args(self) -> list[str]:
        return [
            f"--ServerApp.jpserver_extensions={{'{GATEWAY_CLIENT_EXTENSION}': True}}",
            # No local compute on the hub's host: kernels run on the gateway only.
            "--ServerApp.terminals_enabled=False",
            # kernelfleet's gateway sets TCP_NODELAY: no need to ACK its every frame at once.
            "--GatewayChannelsConnection.quick_ack=False",
        ]

    @default("cmd")
    def _default_cmd(self) -> list[str]:
        # The singleuser script of the venv the hub runs from, not whatever PATH finds.
        return [str(Path(sys.executable).parent / "jupyterhub-singleuser")]

    @default("default_url")
    def _default_default_url(self) -> str:
        return "/lab"

    @default("disable_user_config")
    def _default_disable_user_config(self) -> bool:
        # A user could otherwise drop a jupyter_server_config.py into their home and run code.
        return True

    @default("http_timeout")
    def _default_http_timeout(self) -> int:
        # A JupyterLab server needs ~2.5 s of CPU to start: 50 users logging in at once on
        # a 2-core host wait ~2 min for theirs, and failing a spawn that would have worked
        # is worse than waiting (bench/README.md, users phase).
        return SERVER_HTTP_TIMEOUT_S

    @default("start_timeout")
    def _default_start_timeout(self) -> int:
        return 60

    @default("home_dir")
    def _default_home_dir(self) -> str:
        if not self.home_root:
            raise ValueError("KernelfleetSpawner.home_root is not set")
        return str(user_home(Path(self.home_root), self.user.name))

    @default("notebook_dir")
    def _default_notebook_dir(self) -> str:
        return self.home_dir

    @validate("gateway_url")
    def _validate_gateway_url(self, proposal: Any) -> str:
        url = str(proposal.value).rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"gateway_url must start with http:// or https://, got {url!r}")
        return url

    def gateway_env(self) -> dict[str, str]:
        """The JUPYTER_GATEWAY_* environment that points the notebook server at the gateway."""
        request_timeout = self.kernel_launch_timeout + self.gateway_request_margin
        return {
            "JUPYTER_GATEWAY_URL": self.gateway_url,
            "JUPYTER_GATEWAY_AUTH_SCHEME": "token",
            # The gateway resolves this per-server hub token to the user (GET /hub/api/user).
            "JUPYTER_GATEWAY_AUTH_TOKEN": self.api_token or "",
            "JUPYTER_GATEWAY_REQUEST_TIMEOUT": str(request_timeout),
            # jupyter-server raises KERNEL_LAUNCH_TIMEOUT to request_timeout - pad; with
            # pad = margin the launch timeout stays what the platform config says.
            "JUPYTER_GATEWAY_LAUNCH_TIMEOUT_PAD": str(self.gateway_request_margin),
            "KERNEL_LAUNCH_TIMEOUT": str(self.kernel_launch_timeout),
        }

    def get_env(self) -> dict[str, str]:
        """JupyterHub's environment for the server plus :meth:`gateway_env`."""
        env = super().get_env()
        env.update(self.gateway_env())
        return env

    def get_args(self) -> list[str]:
        """JupyterHub's arguments plus :attr:`server_args` (and --allow-root as root)."""
        args = super().get_args() + list(self.server_args)
        if os.geteuid() == 0:
            args.append("--allow-root")
        return args

    async def start(self) -> Any:
        """Create the user's home (mode 0700), pick the server's port, start the server."""
        home = Path(self.home_dir)
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        home.chmod(0o700)
        port_range = parse_range(self.server_port_range)
        if port_range is not None and self.port in (0, self._picked_port):
            self.port = self._picked_port = SERVER_PORTS.pick(self.ip or "127.0.0.1",
                                                              port_range)  # fmt: skip
        return await super().start()

    async def progress(self) -> AsyncIterator[dict[str, Any]]:
        """One message for the spawn page while the server starts."""
        yield {
            "progress": 50,
            "message": f"Starting JupyterLab for {self.user.name} "
            f"(kernels run on the gateway); waiting up to {self.http_timeout} s for it",
        }


def user_home(root: Path, username: str) -> Path:
    """``root/username``; refuses names that would point outside ``root``."""
    if not username or username in {".", ".."} or "/" in username or "\0" in username:
        raise ValueError(f"user name {username!r} cannot be used as a folder name")
    return root / username
