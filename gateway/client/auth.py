"""Who the notebook server is when it talks to the gateway.

Under JupyterHub every single-user server gets its own hub API token in
``JUPYTERHUB_API_TOKEN``; sending it to the gateway lets ``gateway.server`` resolve the
user with the hub API, so each user's kernels are owned by that user (docs/contracts.md).
"""

from __future__ import annotations

import os

from jupyter_server.gateway.gateway_client import GatewayClient
from traitlets import Unicode, default

HUB_TOKEN_ENV = "JUPYTERHUB_API_TOKEN"  # noqa: S105 (a variable name, not a secret)


class HubGatewayClient(GatewayClient):
    """`GatewayClient` whose auth token defaults to the JupyterHub API token.

    Precedence: ``GatewayClient.auth_token`` config, then ``JUPYTER_GATEWAY_AUTH_TOKEN``,
    then the variable named by ``hub_token_env``. The scheme stays ``token``
    (``Authorization: token <hub API token>``) unless configured otherwise.
    """

    hub_token_env = Unicode(
        HUB_TOKEN_ENV,
        config=True,
        help="""Environment variable holding the token to send to the gateway when
        neither GatewayClient.auth_token nor JUPYTER_GATEWAY_AUTH_TOKEN is set.
        JupyterHub's spawner sets JUPYTERHUB_API_TOKEN for each user's server.""",
    )

    @default("auth_token")
    def _auth_token_default(self) -> str:
        return os.environ.get(self.auth_token_env) or os.environ.get(self.hub_token_env, "")


def install_gateway_client(parent: object) -> GatewayClient:
    """Make `HubGatewayClient` the process's ``GatewayClient`` singleton and return it.

    Must run before ``ServerApp.init_configurables`` (which calls
    ``GatewayClient.instance()``), i.e. in the extension's link phase. If another
    ``GatewayClient`` already exists, it is kept and only given the hub token if it has
    no token of its own.
    """
    if not GatewayClient.initialized():
        return HubGatewayClient.instance(parent=parent)
    client = GatewayClient.instance()
    if not client.auth_token and os.environ.get(HUB_TOKEN_ENV):
        client.auth_token = os.environ[HUB_TOKEN_ENV]
    return client
