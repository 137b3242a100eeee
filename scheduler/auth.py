"""Who is calling the scheduler's API, and what they may see.

Two kinds of callers:

- the **service token** (``secrets/scheduler_token``): the gateway, the CLI and ops
  tools. Admin: sees everything, and is the only caller that may change state (admit,
  withdraw, release, report activity).
- a **JupyterHub API token** of a user (optional: only when the scheduler knows the hub's
  API URL). It is resolved with ``GET {hub_api}/user`` and cached for ``ttl_s``. A user
  reads only their own usage and queue position; a hub admin reads everything. Hub
  services' tokens are not users and are refused.

Tokens are compared in constant time and never logged; the cache is keyed by a hash.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from .errors import Forbidden, HubUnavailable

SERVICE_NAME = "kernelfleet-service"
NEGATIVE_TTL_S = 5.0
MAX_CACHE_ENTRIES = 10_000
HUB_UNREACHABLE = (
    "JupyterHub's API is unreachable, so the scheduler cannot verify your token. "
    "Try again in a minute."
)


@dataclass(frozen=True)
class Caller:
    """An authenticated caller of the API."""

    name: str
    admin: bool = False
    service: bool = False
    groups: tuple[str, ...] = ()

    def require_service(self, action: str) -> None:
        """Forbidden unless this is the service token."""
        if not self.service:
            raise Forbidden(f"Only the kernelfleet services may {action}.")

    def require_admin(self) -> None:
        """Forbidden unless an admin (the service token, or a hub admin)."""
        if not self.admin:
            raise Forbidden(
                "Only admins may see this. You can see your own usage at "
                f"/v1/users/{self.name}/usage and your queue position at "
                f"/v1/users/{self.name}/queue."
            )

    def require_self_or_admin(self, user: str) -> None:
        """Forbidden unless ``user`` is the caller, or the caller is an admin."""
        if not self.admin and user != self.name:
            raise Forbidden("You may only see your own usage and queue position.")


SERVICE = Caller(name=SERVICE_NAME, admin=True, service=True)


class TokenResolver(Protocol):
    """Turns a non-service token into a Caller (None: not a valid user token)."""

    async def resolve(self, token: str) -> Caller | None: ...

    async def aclose(self) -> None: ...


def is_service_token(token: str, service_token: str) -> bool:
    """Constant-time comparison with the service token."""
    return hmac.compare_digest(token.encode(), service_token.encode())


class HubTokenResolver:
    """Resolves users' hub API tokens with ``GET {hub_api_url}/user``, cached for ``ttl_s``."""

    def __init__(
        self,
        hub_api_url: str,
        *,
        ttl_s: float = 60.0,
        timeout_s: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.user_url = hub_api_url.rstrip("/") + "/user"
        self.ttl_s = ttl_s
        self._clock = clock
        self._client = httpx.AsyncClient(timeout=timeout_s, transport=transport)
        self._cache: dict[str, tuple[float, Caller | None]] = {}

    async def resolve(self, token: str) -> Caller | None:
        """The caller behind ``token``, None if the hub does not know it; HubUnavailable."""
        key = hashlib.sha256(token.encode()).hexdigest()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        try:
            response = await self._client.get(
                self.user_url, headers={"Authorization": f"token {token}"}
            )
        except httpx.HTTPError as e:
            raise HubUnavailable(
                HUB_UNREACHABLE, log_message=f"GET {self.user_url}: {type(e).__name__}"
            ) from e
        if response.status_code in (401, 403, 404):
            self._remember(key, None, NEGATIVE_TTL_S)
            return None
        caller = _caller_from(response) if response.status_code == 200 else None
        if caller is None and response.status_code != 200:
            raise HubUnavailable(
                HUB_UNREACHABLE, log_message=f"GET {self.user_url}: {response.status_code}"
            )
        self._remember(key, caller, self.ttl_s if caller else NEGATIVE_TTL_S)
        return caller

    def _remember(self, key: str, caller: Caller | None, ttl_s: float) -> None:
        now = self._clock()
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        self._cache[key] = (now + ttl_s, caller)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


def _caller_from(response: httpx.Response) -> Caller | None:
    """A user caller from the hub's user model; None for services or odd answers."""
    try:
        model: Any = response.json()
    except ValueError:
        return None
    if not isinstance(model, dict) or model.get("kind", "user") != "user":
        return None
    name = model.get("name")
    if not isinstance(name, str) or not name:
        return None
    groups = model.get("groups") or []
    return Caller(
        name=name,
        admin=bool(model.get("admin")),
        groups=tuple(sorted(g for g in groups if isinstance(g, str))),
    )
