"""kernelfleet's gateway client: a jupyter-server 2 extension for each user's notebook server.

Enable it with ``--ServerApp.jpserver_extensions="{'gateway.client': True}"`` next to a
gateway URL (``JUPYTER_GATEWAY_URL`` or ``--GatewayClient.url``). It makes JupyterLab run
cells through Enterprise Gateway in a real browser (`channels`), sets TCP_NODELAY on both
kernel websocket hops, authenticates to the gateway with the user's hub API token
(`auth`) and shows the gateway's refusals verbatim (`errors`).
"""

from __future__ import annotations

from typing import Any

from .extension import link_extension, load_extension


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    """jupyter-server's entry point: this module is the extension."""
    return [{"module": "gateway.client"}]


def _link_jupyter_server_extension(serverapp: Any) -> None:
    """Called before the server creates its managers."""
    link_extension(serverapp)


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Called once the web application exists."""
    load_extension(serverapp)
