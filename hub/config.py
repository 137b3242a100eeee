"""JupyterHub 6 settings for the embedded default, derived from kernelfleet.yaml.

:func:`configure` is what ``hub/jupyterhub_config.py`` calls; tests call it on a plain
traitlets ``Config`` to inspect the settings without starting a hub. It reads (and, where
missing, creates) the secrets under ``<state_dir>/secrets/``, but starts nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kernelfleet.config import PlatformConfig
from kernelfleet.errors import StartupError

from .auth_kinds import (
    check_options,
    import_authenticator,
    ldap_groups_hook,
    ordered_options,
)
from .authenticator import KernelfleetAuthenticator
from .secret_files import read_or_create_secret
from .spawner import KernelfleetSpawner

GATEWAY_SERVICE = "kernelfleet-gateway"
#: The gateway resolves tokens to {user, groups, admin}; it needs no write access.
GATEWAY_SERVICE_SCOPES = ["read:users", "read:groups", "list:users"]
#: Scopes of each server's JUPYTERHUB_API_TOKEN (the token the gateway receives).
#: The first two are JupyterHub's default `server` role. GET /hub/api/user would show the
#: owner's name, admin flag and groups even without the last two (JupyterHub adds them
#: to every token for that endpoint); they are explicit so the gateway's dependence on
#: them is visible here, and so GET /hub/api/users/<self> works too.
SERVER_TOKEN_SCOPES = [
    "users:activity!user",
    "access:servers!server",
    "read:users:name!user",
    "read:users:groups!user",
]
CHP_VERSION = "4"


def configure(c: Any, platform: PlatformConfig) -> None:
    """Fill JupyterHub config ``c`` for ``platform``: network, state, proxy, auth, spawner."""
    state = platform.state_dir
    secrets_dir = state / "secrets"
    secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _configure_network(c, platform)
    _configure_state(c, state)
    _configure_proxy(c, platform)
    _configure_gateway_service(c, read_or_create_secret(secrets_dir / "gateway_service_token"))
    _configure_authenticator(c, platform)
    _configure_spawner(c, platform)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def connect_host(host: str) -> str:
    """Where a local client reaches a server bound to ``host`` (wildcards -> loopback)."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


def chp_path(state_dir: Path) -> Path:
    """The configurable-http-proxy that `kernelfleet up` installed ($KERNELFLEET_CHP names
    it; else the one under the state dir)."""
    named = os.environ.get("KERNELFLEET_CHP")
    if named:
        return Path(named)
    return state_dir / "node" / "node_modules" / ".bin" / "configurable-http-proxy"


def _configure_network(c: Any, platform: PlatformConfig) -> None:
    c.JupyterHub.bind_url = _url(platform.host, platform.ports.hub)
    c.JupyterHub.hub_bind_url = _url(platform.host, platform.ports.hub_api)


def _configure_state(c: Any, state: Path) -> None:
    c.JupyterHub.cookie_secret_file = str(state / "secrets" / "cookie_secret")
    c.JupyterHub.db_url = f"sqlite:///{state / 'jupyterhub.sqlite'}"
    c.JupyterHub.pid_file = str(state / "jupyterhub.pid")
    # Servers are stopped with the hub: Ctrl-C on `kernelfleet up` leaves nothing behind.
    c.JupyterHub.cleanup_servers = True


#: The hub's own HTTP client (proxy API, user servers) opens a connection per request, as
#: JupyterHub did before 6. With keep-alive, a request could go out on a connection that
#: configurable-http-proxy's API server (node: ~5-6 s idle) was closing at that moment:
#: "Can not write request body", and when JupyterHub's retry drew another such connection the
#: user's spawn failed ("Failed to add ... to proxy!", 1 user in 50 in several bench runs at
#: load average ~25). Keeping idle connections 4 s instead of 15 s was not enough: the hub's
#: loop stalls for seconds under that load, so it may read a response (and start counting a
#: connection's idle time) seconds after the proxy sent it and started its own clock.
HUB_CONNECTOR_OPTIONS: dict[str, Any] = {"force_close": True}


def _configure_proxy(c: Any, platform: PlatformConfig) -> None:
    state = platform.state_dir
    chp = chp_path(state)
    if not os.access(chp, os.X_OK):
        raise StartupError(
            f"configurable-http-proxy not found at {chp}; install it with: "
            f"npm install --prefix {state / 'node'} configurable-http-proxy@{CHP_VERSION}"
        )
    c.ConfigurableHTTPProxy.command = [str(chp)]
    c.ConfigurableHTTPProxy.api_url = _url(platform.host, platform.ports.proxy_api)
    c.JupyterHubHTTPClient.connector_options = dict(HUB_CONNECTOR_OPTIONS)
    c.ConfigurableHTTPProxy.pid_file = str(state / "jupyterhub-proxy.pid")
    if not os.environ.get("CONFIGPROXY_AUTH_TOKEN"):
        # Kept in a file so a restarted hub (or an operator) can talk to the same proxy.
        token_file = state / "secrets" / "proxy_auth_token"
        c.ConfigurableHTTPProxy.auth_token = read_or_create_secret(token_file)


def _configure_gateway_service(c: Any, token: str) -> None:
    c.JupyterHub.services = [{"name": GATEWAY_SERVICE, "api_token": token}]
    c.JupyterHub.load_roles = [
        {
            "name": GATEWAY_SERVICE,
            "description": "Resolve hub tokens to users, groups and admin flags",
            "scopes": GATEWAY_SERVICE_SCOPES,
            "services": [GATEWAY_SERVICE],
        }
    ]


def _configure_authenticator(c: Any, platform: PlatformConfig) -> None:
    kind = platform.authenticator.kind
    if kind == "kernelfleet":
        _configure_embedded_auth(c, platform)
    else:
        _configure_external_auth(c, platform, kind)


def _configure_embedded_auth(c: Any, platform: PlatformConfig) -> None:
    c.JupyterHub.authenticator_class = KernelfleetAuthenticator
    auth = c.KernelfleetAuthenticator
    auth.password_file = str(platform.state_dir / "passwords.json")
    auth.users = {
        name: {"groups": list(user.groups), "admin": user.admin}
        for name, user in platform.users.items()
    }
    auth.allowed_users = set(platform.users)
    auth.admin_users = set(platform.admins)
    # Groups are managed by the authenticator (synced at login and refresh), which
    # JupyterHub does not allow together with load_groups.


def _configure_external_auth(c: Any, platform: PlatformConfig, kind: str) -> None:
    source = str(platform.source)
    options = dict(platform.authenticator.options)
    cls = import_authenticator(kind, source=source)
    check_options(cls, options, source=source)
    c.JupyterHub.authenticator_class = cls
    section = c[cls.__name__]
    for name, value in ordered_options(options).items():
        section[name] = value
    if platform.admins and "admin_users" not in options:
        section.admin_users = set(platform.admins)
    if options.get("manage_groups"):
        if kind == "ldap":
            section.post_auth_hook = ldap_groups_hook
    else:
        # Groups come from kernelfleet.yaml's users (added at start; never removed).
        c.JupyterHub.load_groups = {
            group: {"users": members} for group, members in platform.groups().items()
        }


def _configure_spawner(c: Any, platform: PlatformConfig) -> None:
    c.JupyterHub.spawner_class = KernelfleetSpawner
    spawner = c.KernelfleetSpawner
    spawner.home_root = str(platform.state_dir / "home")
    spawner.gateway_url = _url(connect_host(platform.host), platform.ports.gateway)
    spawner.kernel_launch_timeout = platform.kernel_launch_timeout
    spawner.server_token_scopes = list(SERVER_TOKEN_SCOPES)
