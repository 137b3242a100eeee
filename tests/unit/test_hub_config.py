"""hub.config.configure: JupyterHub settings derived from kernelfleet.yaml, no hub started."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml
from jupyterhub.httpclient import JupyterHubHTTPClient
from traitlets.config import Config

from hub import auth_kinds
from hub.auth_kinds import AuthKind, group_name_from_dn, ldap_groups_hook, ordered_options
from hub.authenticator import KernelfleetAuthenticator
from hub.config import GATEWAY_SERVICE_SCOPES, SERVER_TOKEN_SCOPES, chp_path, configure
from hub.spawner import KernelfleetSpawner
from kernelfleet.config import PlatformConfig, load_config
from kernelfleet.errors import ConfigError, StartupError
from tests.support.ports import free_ports

USERS = {
    "alice": {"groups": ["analysts"]},
    "carol": {"groups": ["ml", "analysts"]},
    "ops": {"admin": True},
}


def make_platform(tmp_path: Path, *, with_chp: bool = True, **settings) -> PlatformConfig:
    """A kernelfleet.yaml in tmp_path (state dir inside it), with a stub proxy binary."""
    raw = {
        "host": "127.0.0.1",
        "state_dir": "state",
        "ports": {"hub": 18000, "hub_api": 18081, "proxy_api": 18001, "gateway": 18888},
        "users": USERS,
        "kernel_launch_timeout": 45,
        **settings,
    }
    source = tmp_path / "kernelfleet.yaml"
    source.write_text(yaml.safe_dump(raw))
    platform = load_config(source)
    if with_chp:
        chp = chp_path(platform.state_dir)
        chp.parent.mkdir(parents=True)
        chp.write_text("#!/bin/sh\n")
        chp.chmod(0o755)
    return platform


@pytest.fixture(autouse=True)
def _no_proxy_token_env(monkeypatch) -> None:
    monkeypatch.delenv("CONFIGPROXY_AUTH_TOKEN", raising=False)


def configured(platform: PlatformConfig) -> Config:
    c = Config()
    configure(c, platform)
    return c


def test_network_and_state_files(tmp_path) -> None:
    platform = make_platform(tmp_path)
    c = configured(platform)
    state = platform.state_dir
    assert c.JupyterHub.bind_url == "http://127.0.0.1:18000"
    assert c.JupyterHub.hub_bind_url == "http://127.0.0.1:18081"
    assert c.JupyterHub.db_url == f"sqlite:///{state}/jupyterhub.sqlite"
    assert c.JupyterHub.cookie_secret_file == str(state / "secrets" / "cookie_secret")
    assert c.JupyterHub.pid_file == str(state / "jupyterhub.pid")
    assert stat.S_IMODE((state / "secrets").stat().st_mode) == 0o700


def test_proxy_uses_the_state_dir_binary_and_a_persistent_token(tmp_path) -> None:
    platform = make_platform(tmp_path)
    c = configured(platform)
    proxy = c.ConfigurableHTTPProxy
    assert proxy.command == [str(chp_path(platform.state_dir))]
    assert proxy.api_url == "http://127.0.0.1:18001"
    assert proxy.pid_file == str(platform.state_dir / "jupyterhub-proxy.pid")
    token_file = platform.state_dir / "secrets" / "proxy_auth_token"
    assert proxy.auth_token == token_file.read_text().strip()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert configured(platform).ConfigurableHTTPProxy.auth_token == proxy.auth_token


async def test_the_hub_sends_each_request_to_the_proxy_api_on_a_new_connection(tmp_path) -> None:
    # A reused keep-alive connection could be one the proxy API (node) was closing: the
    # route never got there and, under load, the user's spawn failed (hub/config.py).
    installed = Path(__file__).resolve().parents[2] / ".kernelfleet"
    if not os.access(chp_path(installed), os.X_OK):
        pytest.skip("needs configurable-http-proxy in .kernelfleet/node (kernelfleet setup)")
    options = configured(make_platform(tmp_path)).JupyterHubHTTPClient.connector_options
    connections: list[object] = []

    async def opened(_session: object, _context: object, params: object) -> None:
        connections.append(params)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(opened)
    port, api_port = free_ports(2)
    proxy = subprocess.Popen(
        [str(chp_path(installed)), "--ip", "127.0.0.1", "--port", str(port),
         "--api-ip", "127.0.0.1", "--api-port", str(api_port), "--log-level", "error"],
        env={**os.environ, "CONFIGPROXY_AUTH_TOKEN": "proxy-token"},
    )  # fmt: skip
    client = JupyterHubHTTPClient.instance(connector_options=options,
                                           session_options={"trace_configs": [trace]})  # fmt: skip
    try:
        routes = f"http://127.0.0.1:{api_port}/api/routes"
        auth = {"Authorization": "token proxy-token"}
        async with asyncio.timeout(30):
            while True:  # until the proxy listens
                try:
                    await client.fetch(routes, headers=auth)
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
        before = len(connections)
        body = json.dumps({"target": "http://127.0.0.1:1"})
        for user in ("alice", "carol"):
            await client.fetch(f"{routes}/user/{user}", method="POST", headers=auth, data=body)
        await client.fetch(routes, headers=auth)
        assert len(connections) - before == 3
        listed = await (await client.fetch(routes, headers=auth)).json()
        assert {"/user/alice", "/user/carol"} <= set(listed)
    finally:
        await client.close()
        proxy.terminate()
        proxy.wait(10)


def test_proxy_token_from_env_wins(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CONFIGPROXY_AUTH_TOKEN", "from-the-launcher")
    platform = make_platform(tmp_path)
    c = configured(platform)
    assert "auth_token" not in c.ConfigurableHTTPProxy  # JupyterHub reads the env itself
    assert not (platform.state_dir / "secrets" / "proxy_auth_token").exists()


def test_missing_proxy_binary_names_the_install_command(tmp_path) -> None:
    platform = make_platform(tmp_path, with_chp=False)
    with pytest.raises(StartupError, match="npm install --prefix .*configurable-http-proxy@4"):
        configured(platform)


def test_gateway_service_uses_the_token_file(tmp_path) -> None:
    platform = make_platform(tmp_path)
    token_file = platform.state_dir / "secrets" / "gateway_service_token"
    token_file.parent.mkdir(parents=True)
    token_file.write_text("written-by-kernelfleet-up\n")
    c = configured(platform)
    assert c.JupyterHub.services == [
        {"name": "kernelfleet-gateway", "api_token": "written-by-kernelfleet-up"}
    ]
    (role,) = c.JupyterHub.load_roles
    assert role["services"] == ["kernelfleet-gateway"]
    assert set(role["scopes"]) == set(GATEWAY_SERVICE_SCOPES)
    assert {"read:users", "read:groups", "list:users"} <= set(role["scopes"])


def test_gateway_service_token_is_generated_if_missing(tmp_path) -> None:
    platform = make_platform(tmp_path)
    c = configured(platform)
    token_file = platform.state_dir / "secrets" / "gateway_service_token"
    assert c.JupyterHub.services[0]["api_token"] == token_file.read_text().strip()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600


def test_embedded_authenticator(tmp_path) -> None:
    platform = make_platform(tmp_path)
    c = configured(platform)
    assert c.JupyterHub.authenticator_class is KernelfleetAuthenticator
    auth = KernelfleetAuthenticator(config=c)
    assert auth.password_file == str(platform.state_dir / "passwords.json")
    assert auth.users["carol"] == {"groups": ["ml", "analysts"], "admin": False}
    assert auth.allowed_users == {"alice", "carol", "ops"}
    assert auth.admin_users == {"ops"}
    assert auth.manage_groups is True
    # JupyterHub refuses load_groups together with authenticator-managed groups.
    assert "load_groups" not in c.JupyterHub


def test_spawner_settings(tmp_path) -> None:
    platform = make_platform(tmp_path)
    c = configured(platform)
    assert c.JupyterHub.spawner_class is KernelfleetSpawner
    assert c.KernelfleetSpawner.home_root == str(platform.state_dir / "home")
    assert c.KernelfleetSpawner.gateway_url == "http://127.0.0.1:18888"
    assert c.KernelfleetSpawner.kernel_launch_timeout == 45
    scopes = c.KernelfleetSpawner.server_token_scopes
    assert scopes == SERVER_TOKEN_SCOPES
    assert {"read:users:name!user", "read:users:groups!user", "users:activity!user"} <= set(scopes)


def test_wildcard_host_connects_to_the_gateway_on_loopback(tmp_path) -> None:
    c = configured(make_platform(tmp_path, host="0.0.0.0"))
    assert c.JupyterHub.bind_url == "http://0.0.0.0:18000"
    assert c.KernelfleetSpawner.gateway_url == "http://127.0.0.1:18888"


def test_config_file_loads_the_platform_from_env(tmp_path, monkeypatch) -> None:
    platform = make_platform(tmp_path)
    monkeypatch.setenv("KERNELFLEET_CONFIG", str(platform.source))
    config_file = Path(__file__).parents[2] / "hub" / "jupyterhub_config.py"
    c = Config()
    exec(compile(config_file.read_text(), str(config_file), "exec"), {"get_config": lambda: c})
    assert c.JupyterHub.bind_url == "http://127.0.0.1:18000"
    assert c.JupyterHub.authenticator_class is KernelfleetAuthenticator


# --- external authenticators -------------------------------------------------------------


@pytest.fixture
def dummy_ldap(monkeypatch) -> None:
    """Stand in JupyterHub's DummyAuthenticator for LDAP, so these tests need no LDAP package."""
    stand_in = AuthKind("jupyterhub.auth.DummyAuthenticator", "jupyterhub-ldapauthenticator")
    monkeypatch.setitem(auth_kinds.EXTERNAL_KINDS, "ldap", stand_in)


def test_external_options_become_traits(tmp_path, dummy_ldap) -> None:
    options = {"allowed_users": ["alice"], "auth_refresh_age": 60}
    c = configured(make_platform(tmp_path, authenticator={"kind": "ldap", "options": options}))
    from jupyterhub.auth import DummyAuthenticator

    assert c.JupyterHub.authenticator_class is DummyAuthenticator
    auth = DummyAuthenticator(config=c)
    assert auth.allowed_users == {"alice"}
    assert auth.auth_refresh_age == 60
    assert auth.admin_users == {"ops"}


def test_external_without_manage_groups_loads_groups_from_config(tmp_path, dummy_ldap) -> None:
    c = configured(make_platform(tmp_path, authenticator={"kind": "ldap"}))
    assert c.JupyterHub.load_groups == {
        "analysts": {"users": ["alice", "carol"]},
        "ml": {"users": ["carol"]},
    }


def test_ldap_with_manage_groups_maps_ldap_groups(tmp_path, dummy_ldap) -> None:
    options = {"manage_groups": True}
    c = configured(make_platform(tmp_path, authenticator={"kind": "ldap", "options": options}))
    assert "load_groups" not in c.JupyterHub
    assert c.DummyAuthenticator.post_auth_hook is ldap_groups_hook


def test_unknown_option_names_the_field(tmp_path, dummy_ldap) -> None:
    platform = make_platform(tmp_path, authenticator={"kind": "ldap", "options": {"sever": "x"}})
    with pytest.raises(ConfigError, match=r"authenticator\.options\.sever: not a setting"):
        configured(platform)


@pytest.mark.parametrize(
    ("kind", "module", "package"),
    [
        ("ldap", "ldapauthenticator", "jupyterhub-ldapauthenticator"),
        ("oauth", "oauthenticator.generic", "oauthenticator"),
    ],
)
def test_missing_package_says_what_to_install(tmp_path, monkeypatch, kind, module, package) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    platform = make_platform(tmp_path, authenticator={"kind": kind})
    with pytest.raises(ConfigError, match=f"authenticator.kind: .*pip install {package}"):
        configured(platform)


def test_real_ldap_authenticator(tmp_path) -> None:
    ldap = pytest.importorskip("ldapauthenticator")
    options = {
        "server_address": "ldap.example.org",
        "bind_dn_template": ["uid={username},ou=people,dc=example,dc=org"],
        "allowed_groups": ["cn=ml,ou=groups,dc=example,dc=org"],
        "manage_groups": True,
    }
    c = configured(make_platform(tmp_path, authenticator={"kind": "ldap", "options": options}))
    assert c.JupyterHub.authenticator_class is ldap.LDAPAuthenticator
    auth = ldap.LDAPAuthenticator(config=c)
    assert auth.server_address == "ldap.example.org"
    assert auth.allowed_groups == ["cn=ml,ou=groups,dc=example,dc=org"]
    assert auth.manage_groups is True
    assert auth.post_auth_hook is ldap_groups_hook


def test_real_generic_oauthenticator(tmp_path, monkeypatch) -> None:
    generic = pytest.importorskip("oauthenticator.generic")
    monkeypatch.setenv("OAUTH_CLIENT_ID", "kernelfleet")
    monkeypatch.setenv("OAUTH_CLIENT_SECRET", "from-env")
    options = {
        # group settings before manage_groups: configure must reorder them
        "auth_state_groups_key": "oauth_user.groups",
        "allowed_groups": ["analysts"],
        "manage_groups": True,
        "authorize_url": "https://sso.example.org/auth",
        "token_url": "https://sso.example.org/token",
        "userdata_url": "https://sso.example.org/userinfo",
        "username_claim": "preferred_username",
    }
    c = configured(make_platform(tmp_path, authenticator={"kind": "oauth", "options": options}))
    assert c.JupyterHub.authenticator_class is generic.GenericOAuthenticator
    auth = generic.GenericOAuthenticator(config=c)
    assert auth.client_id == "kernelfleet"
    assert auth.client_secret == "from-env"
    assert auth.manage_groups is True
    assert auth.allowed_groups == {"analysts"}
    assert auth.auth_state_groups_key == "oauth_user.groups"
    assert "load_groups" not in c.JupyterHub


def test_ordered_options_puts_manage_groups_first() -> None:
    assert list(ordered_options({"allowed_groups": [], "manage_groups": True, "x": 1})) == [
        "manage_groups",
        "allowed_groups",
        "x",
    ]


@pytest.mark.parametrize(
    ("dn", "name"),
    [("cn=ml,ou=groups,dc=example,dc=org", "ml"), ("CN= analysts ,dc=x", "analysts"), ("ml", "ml")],
)
def test_group_name_from_dn(dn: str, name: str) -> None:
    assert group_name_from_dn(dn) == name


def test_ldap_groups_hook_sets_groups() -> None:
    auth = {"name": "carol", "auth_state": {"ldap_groups": ["cn=ml,ou=g,dc=x", "cn=analysts,dc=x"]}}
    assert ldap_groups_hook(None, None, auth)["groups"] == ["analysts", "ml"]
    assert ldap_groups_hook(None, None, {"name": "x", "auth_state": None})["groups"] == []
