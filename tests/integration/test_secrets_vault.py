"""The Vault provider over HTTP, against the Vault stand-in and, when VAULT_ADDR is set, a
real Vault (a dev server: ``vault server -dev``, with VAULT_TOKEN its root token and KV v2 at
``secret/``). Kubernetes auth needs a cluster behind Vault, so only the stand-in covers it.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hvac
import pytest

from gateway.server.errors import GatewayError
from gateway.server.identity import Identity
from gateway.server.secrets import (
    SecretForbidden,
    SecretNotFound,
    SecretResolver,
    SecretsUnavailable,
)
from gateway.server.secrets_vault import KubernetesAuth, TokenAuth, VaultSecretsProvider
from tests.support.vault_standin import VaultStandIn

MOUNT = "secret"


@dataclass
class Vault:
    """A Vault to test against: its URL, a root token, and a fresh path prefix."""

    url: str
    root_token: str
    prefix: str
    standin: VaultStandIn | None = None

    def client(self, token: str | None = None) -> hvac.Client:
        return hvac.Client(url=self.url, token=token or self.root_token)

    def path(self, rest: str) -> str:
        """The API path of ``<prefix>/<rest>`` in the KV v2 mount."""
        return f"{MOUNT}/data/{self.prefix}/{rest}"

    def write(self, rest: str, data: dict[str, str]) -> None:
        self.client().secrets.kv.v2.create_or_update_secret(
            path=f"{self.prefix}/{rest}", secret=data, mount_point=MOUNT
        )

    def token_for(self, hcl: str) -> str:
        """A token whose only policy is ``hcl``."""
        name = "kf-" + secrets.token_hex(4)
        root = self.client()
        root.sys.create_or_update_policy(name=name, policy=hcl)
        return str(root.auth.token.create(policies=[name], ttl="10m")["auth"]["client_token"])


@pytest.fixture(scope="module", params=["standin", "real"])
def vault(request: pytest.FixtureRequest) -> Iterator[Vault]:
    prefix = "kftest-" + secrets.token_hex(4)
    if request.param == "real":
        if not os.environ.get("VAULT_ADDR") or not os.environ.get("VAULT_TOKEN"):
            pytest.skip("set VAULT_ADDR and VAULT_TOKEN (a dev server's root token)")
        yield Vault(os.environ["VAULT_ADDR"], os.environ["VAULT_TOKEN"], prefix)
        return
    standin = VaultStandIn()
    standin.start()
    yield Vault(standin.url, standin.root_token, prefix, standin)
    standin.stop()


@pytest.fixture(scope="module")
def passwords(vault: Vault) -> dict[str, str]:
    values = {team: f"{team}-{secrets.token_hex(6)}" for team in ("analysts", "ml")}
    for team, password in values.items():
        vault.write(f"teams/{team}/warehouse", {"password": password, "username": team})
    return values


def _provider(vault: Vault, token: str) -> VaultSecretsProvider:
    return VaultSecretsProvider(vault.url, auth=TokenAuth(token), timeout_s=5)


async def test_token_auth_reads_kv_v2_and_tells_missing_from_forbidden(
    vault: Vault, passwords: dict[str, str]
) -> None:
    token = vault.token_for(f'path "{MOUNT}/data/{vault.prefix}/teams/analysts/*" '
                            '{ capabilities = ["read"] }')  # fmt: skip
    provider = _provider(vault, token)
    try:
        found = await provider.read(vault.path("teams/analysts/warehouse"))
        assert found == {"password": passwords["analysts"], "username": "analysts"}
        with pytest.raises(SecretForbidden, match="permission denied by Vault"):
            await provider.read(vault.path("teams/ml/warehouse"))
        with pytest.raises(SecretNotFound, match="not found in Vault"):
            await provider.read(vault.path("teams/analysts/nothing-here"))
    finally:
        await provider.aclose()


async def test_each_user_gets_their_own_groups_secret_through_vault(
    vault: Vault, passwords: dict[str, str]
) -> None:
    resolver = SecretResolver(_provider(vault, vault.root_token))
    template = vault.path("teams/{group}/warehouse")
    secret = {"path": template, "env": {"WAREHOUSE_PASSWORD": "password"}}
    spec = {"metadata": {"kernelfleet": {"name": "wh", "pool": "cpu", "secrets": [secret]}}}
    try:
        alice = await resolver.resolve(Identity("alice", frozenset({"analysts"})), "wh", spec)
        bob = await resolver.resolve(Identity("bob", frozenset({"ml"})), "wh", spec)
        assert alice.env == {"WAREHOUSE_PASSWORD": passwords["analysts"]}
        assert bob.env == {"WAREHOUSE_PASSWORD": passwords["ml"]}
        with pytest.raises(GatewayError) as refused:
            await resolver.resolve(Identity("eve", frozenset({"finance"})), "wh", spec)
        assert refused.value.message == (
            "Kernel 'wh' cannot start: secret for WAREHOUSE_PASSWORD: "
            f"{vault.path('teams/finance/warehouse')}: not found in Vault."
        )
        assert not any(value in refused.value.message for value in passwords.values())
    finally:
        await resolver.aclose()


async def test_kubernetes_auth_logs_in_and_again_when_its_token_expires(
    vault: Vault, passwords: dict[str, str], tmp_path: Path
) -> None:
    if vault.standin is None:
        pytest.skip("Kubernetes auth needs a cluster behind Vault")
    vault.standin.policies["team-reader"] = [(f"{MOUNT}/data/{vault.prefix}/*", {"read"})]
    jwt = tmp_path / "token"
    jwt.write_text("service-account-jwt\n")
    vault.standin.add_kubernetes_role("kernelfleet-gateway", jwt="service-account-jwt",
                                      policies=["team-reader"])  # fmt: skip
    provider = VaultSecretsProvider(
        vault.url, auth=KubernetesAuth("kernelfleet-gateway", jwt_path=str(jwt))
    )
    try:
        path = vault.path("teams/ml/warehouse")
        assert (await provider.read(path))["password"] == passwords["ml"]
        logins = [r for r in vault.standin.requests if r[1] == "auth/kubernetes/login"]
        assert len(logins) == 1
        for token, policies in list(vault.standin.tokens.items()):
            if policies == ["team-reader"]:
                vault.standin.expire(token)
        assert (await provider.read(path))["password"] == passwords["ml"]
        logins = [r for r in vault.standin.requests if r[1] == "auth/kubernetes/login"]
        assert len(logins) == 2
    finally:
        await provider.aclose()
    wrong = tmp_path / "wrong"
    wrong.write_text("someone-elses-jwt")
    refused = VaultSecretsProvider(vault.url, auth=KubernetesAuth("kernelfleet-gateway",
                                                                  jwt_path=str(wrong)))  # fmt: skip
    with pytest.raises(SecretsUnavailable, match="refused the Kubernetes login for role"):
        await refused.read(path)
    await refused.aclose()


async def test_an_unreachable_vault_makes_secrets_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    provider = VaultSecretsProvider(f"http://127.0.0.1:{port}", auth=TokenAuth("t"), timeout_s=2)
    with pytest.raises(SecretsUnavailable, match=r"is unreachable \(ConnectionError\)"):
        await provider.read("secret/data/x")
    await provider.aclose()
