"""The ``vault`` secrets provider: HashiCorp Vault through hvac (KV v2, or KV v1).

Paths are Vault API paths as the kernelspec writes them, e.g.
``kv/data/teams/analysts/warehouse`` for a KV v2 mount ``kv``; the secret's key → value
mapping is ``data.data`` (KV v2) or ``data`` (KV v1).

The gateway authenticates as itself, never as the user (the templating in
:mod:`gateway.server.secrets` decides which paths a user gets):

- :class:`TokenAuth`: a token from a file or ``VAULT_TOKEN`` (the embedded default);
- :class:`KubernetesAuth`: the gateway pod's service-account JWT, exchanged at
  ``auth/<mount>/login`` for a token; logged in again once when Vault refuses the token
  (it expired).

hvac is synchronous (requests); reads run in a worker thread so EG's loop never waits on
Vault. Errors carry a reason and never a value or a token.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import requests

from .secrets import SecretForbidden, SecretNotFound, SecretsUnavailable

DEFAULT_JWT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"


@dataclass(frozen=True, repr=False)
class TokenAuth:
    """A fixed Vault token (``repr`` hides it)."""

    token: str


@dataclass(frozen=True)
class KubernetesAuth:
    """Vault's Kubernetes auth method: ``role``, the JWT file, the method's mount."""

    role: str
    jwt_path: str = DEFAULT_JWT_PATH
    mount: str = "kubernetes"


ClientFactory = Callable[..., Any]


class VaultSecretsProvider:
    """Reads secrets from Vault at ``addr`` (see module docstring)."""

    label = "Vault"

    def __init__(
        self,
        addr: str,
        *,
        auth: TokenAuth | KubernetesAuth,
        namespace: str = "",
        verify: bool | str = True,
        timeout_s: float = 10.0,
        client_factory: ClientFactory = hvac.Client,
    ) -> None:
        self.addr = addr.rstrip("/")
        self.auth = auth
        token = auth.token if isinstance(auth, TokenAuth) else None
        self._client = client_factory(
            url=self.addr, token=token, namespace=namespace or None, verify=verify,
            timeout=timeout_s,
        )  # fmt: skip
        self._login_lock = threading.Lock()
        self._logged_in = isinstance(auth, TokenAuth)

    async def read(self, path: str) -> Mapping[str, Any]:
        """The secret's key → value mapping at ``path``."""
        return await asyncio.to_thread(self._read, path)

    async def aclose(self) -> None:
        await asyncio.to_thread(self._client.adapter.close)

    # -- in the worker thread ----------------------------------------------------------------

    def _read(self, path: str) -> Mapping[str, Any]:
        self._ensure_login()
        try:
            answer = self._get(path)
        except hvac.exceptions.Forbidden:
            if not isinstance(self.auth, KubernetesAuth):
                raise SecretForbidden("permission denied by Vault") from None
            self._login()  # the token may have expired: once more with a fresh one
            try:
                answer = self._get(path)
            except hvac.exceptions.Forbidden:
                raise SecretForbidden("permission denied by Vault") from None
        if answer is None:
            raise SecretNotFound("not found in Vault")
        return _secret_data(answer)

    def _get(self, path: str) -> Any:
        try:
            return self._client.read(path.strip("/"))
        except hvac.exceptions.Forbidden:
            raise
        except hvac.exceptions.Unauthorized:
            raise SecretsUnavailable("Vault refused the gateway's credentials") from None
        except hvac.exceptions.VaultError as e:
            raise SecretsUnavailable(f"Vault answered {type(e).__name__}") from None
        except requests.RequestException as e:
            raise SecretsUnavailable(
                f"Vault at {self.addr} is unreachable ({type(e).__name__})"
            ) from None

    def _ensure_login(self) -> None:
        if not self._logged_in:
            self._login()

    def _login(self) -> None:
        auth = self.auth
        if not isinstance(auth, KubernetesAuth):
            return
        with self._login_lock:
            try:
                jwt = Path(auth.jwt_path).read_text().strip()
            except OSError as e:
                raise SecretsUnavailable(
                    f"cannot read the service account token {auth.jwt_path}: {e.strerror}"
                ) from None
            try:
                self._client.auth.kubernetes.login(role=auth.role, jwt=jwt, mount_point=auth.mount)
            except hvac.exceptions.VaultError as e:
                raise SecretsUnavailable(
                    f"Vault refused the Kubernetes login for role '{auth.role}' "
                    f"({type(e).__name__})"
                ) from None
            except requests.RequestException as e:
                raise SecretsUnavailable(
                    f"Vault at {self.addr} is unreachable ({type(e).__name__})"
                ) from None
            self._logged_in = True


def _secret_data(answer: Mapping[str, Any]) -> Mapping[str, Any]:
    """``data.data`` of a KV v2 answer, ``data`` of a KV v1 one."""
    data = answer.get("data")
    if isinstance(data, Mapping) and isinstance(data.get("metadata"), Mapping):
        data = data.get("data")
    if not isinstance(data, Mapping):
        raise SecretNotFound("not found in Vault (no data; deleted?)")
    return data
