"""Wiring of the ``gateway.client`` jupyter-server extension into a ``ServerApp``.

Link phase (before the server creates its managers): install `HubGatewayClient`, the
`GatewayChannelsConnection` websocket proxy, `KernelfleetGatewayKernelManager` and the log
filter that hides tokens.
Load phase (the web app exists): register the kernels/sessions/kernelspecs/status API
routes that report gateway errors verbatim. Without a gateway URL only the log filter is
installed: kernels are local and the stock classes are right.
"""

from __future__ import annotations

import os
from typing import Any

from jupyter_server.gateway.gateway_client import GatewayClient

from .auth import install_gateway_client
from .channels import GatewayChannelsConnection
from .errors import gateway_error_handlers
from .managers import KernelfleetGatewayKernelManager
from .redact import install_redaction, secrets_in


def link_extension(serverapp: Any) -> None:
    """Configure ``serverapp`` to talk to the gateway the kernelfleet way."""
    client = install_gateway_client(parent=serverapp)
    install_redaction(serverapp.log, secrets_in(os.environ) | {client.auth_token})
    if not client.gateway_enabled:
        serverapp.log.info("gateway.client: no gateway URL configured; extension inactive")
        return
    if "kernel_websocket_connection_class" in serverapp.config.get("ServerApp", {}):
        serverapp.log.warning(
            "gateway.client: ServerApp.kernel_websocket_connection_class is configured; "
            "keeping it (the browser may fail to run cells, see DESIGN.md)"
        )
    else:
        serverapp.kernel_websocket_connection_class = GatewayChannelsConnection
    mapping = serverapp.config.GatewayMappingKernelManager
    if "kernel_manager_class" not in mapping:  # a configured class wins
        cls = KernelfleetGatewayKernelManager
        mapping.kernel_manager_class = f"{cls.__module__}.{cls.__qualname__}"
    serverapp.log.info(
        "gateway.client: kernels via %s (auth %s)",
        client.url,
        "token set" if client.auth_token else "no token",
    )


def load_extension(serverapp: Any) -> None:
    """Register the API routes that report gateway errors in the gateway's words."""
    if not GatewayClient.instance().gateway_enabled:
        return
    serverapp.web_app.add_handlers(".*$", gateway_error_handlers(serverapp.base_url))
