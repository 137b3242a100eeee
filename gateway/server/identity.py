"""Who is calling: resolve a JupyterHub API token into an :class:`Identity`.

Identity comes from JupyterHub, never from the client (DESIGN.md, security model). Each
request carries the user's hub API token; ``GET {hub_api_url}/user`` with that token answers
the owner's model (``kind``, ``name``, ``admin``, ``groups``). Answers are cached for a short
TTL, keyed by a hash of the token so that tokens are not kept in memory longer than needed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from .errors import GatewayError

log = logging.getLogger("kernelfleet.gateway")

MISSING_TOKEN = (
    "Missing JupyterHub API token: send 'Authorization: token <token>' "
    "(or ?token=<token> on websockets)."
)
INVALID_TOKEN = "Invalid or expired JupyterHub API token."
HUB_UNREACHABLE = (
    "The kernelfleet gateway cannot reach JupyterHub to check your identity. Try again in a minute."
)
# Invalid tokens are remembered briefly so a client retrying in a loop does not hammer the hub.
NEGATIVE_TTL_S = 5.0
MAX_CACHE_ENTRIES = 10_000


@dataclass(frozen=True)
class Identity:
    """The verified caller: a hub user (or the gateway's own hub service, as admin)."""

    name: str
    groups: frozenset[str] = field(default_factory=frozenset)
    admin: bool = False
    kind: str = "user"


def token_from_request(authorization: str | None, query_token: str | None) -> str | None:
    """The hub token a request carries: ``Authorization: token|bearer <t>``, else ``?token=``."""
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() in ("token", "bearer") and value.strip():
            return value.strip()
    if query_token:
        return query_token.strip() or None
    return None


class HubIdentityResolver:
    """Turns hub API tokens into identities, with a TTL cache and one hub call per token.

    ``admin_token`` is the gateway's own hub service token (``kernelfleet-gateway``): whoever
    presents it is admin. Other service tokens are refused, since a service is not a user
    who could own kernels. ``clock`` is injectable so tests can jump time.
    """

    def __init__(
        self,
        hub_api_url: str,
        *,
        ttl_s: float = 60.0,
        admin_token: str = "",
        timeout_s: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.user_url = hub_api_url.rstrip("/") + "/user"
        self.ttl_s = ttl_s
        self._admin_key = _key(admin_token) if admin_token else ""
        self._clock = clock
        self._client = httpx.AsyncClient(timeout=timeout_s, transport=transport)
        self._cache: dict[str, tuple[float, Identity | None]] = {}
        self._inflight: dict[str, asyncio.Future[Identity | None]] = {}

    async def resolve(self, token: str | None) -> Identity:
        """The identity behind ``token``; GatewayError 401 if none (503 if the hub is down)."""
        if not token:
            raise GatewayError(401, MISSING_TOKEN, code="missing_token")
        key = _key(token)
        cached = self._cache.get(key)
        if cached is not None and cached[0] > self._clock():
            identity = cached[1]
        else:
            identity = await self._resolve_once(key, token)
        if identity is None:
            raise GatewayError(401, INVALID_TOKEN, code="invalid_token")
        if identity.kind == "service" and not identity.admin:
            raise GatewayError(
                403,
                f"Hub service '{identity.name}' may not use the kernelfleet gateway.",
                code="service_not_allowed",
            )
        return identity

    async def _resolve_once(self, key: str, token: str) -> Identity | None:
        """Ask the hub, sharing one request among concurrent callers with the same token."""
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._fetch(key, token))
            self._inflight[key] = future
            future.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(future)

    async def _fetch(self, key: str, token: str) -> Identity | None:
        try:
            response = await self._client.get(
                self.user_url, headers={"Authorization": f"token {token}"}
            )
        except httpx.HTTPError as e:
            raise GatewayError(
                503,
                HUB_UNREACHABLE,
                code="hub_unreachable",
                log_message=f"GET {self.user_url} failed: {type(e).__name__}",
            ) from e
        if response.status_code in (401, 403):
            self._remember(key, None, NEGATIVE_TTL_S)
            return None
        if response.status_code != 200:
            raise GatewayError(
                503,
                HUB_UNREACHABLE,
                code="hub_unreachable",
                log_message=f"GET {self.user_url} answered {response.status_code}",
            )
        identity = self._identity_from_model(key, response)
        self._remember(key, identity, self.ttl_s)
        return identity

    def _identity_from_model(self, key: str, response: httpx.Response) -> Identity:
        try:
            model: Any = response.json()
            name = model["name"]
            if not isinstance(name, str) or not name:
                raise ValueError("no name")
        except (ValueError, KeyError, TypeError) as e:
            raise GatewayError(
                503,
                HUB_UNREACHABLE,
                code="hub_bad_answer",
                log_message=f"GET {self.user_url} answered a model without a name",
            ) from e
        is_admin_token = bool(self._admin_key) and hmac.compare_digest(key, self._admin_key)
        groups = model.get("groups") or []
        return Identity(
            name=name,
            groups=frozenset(g for g in groups if isinstance(g, str)),
            admin=bool(model.get("admin")) or is_admin_token,
            kind=str(model.get("kind") or "user"),
        )

    def _remember(self, key: str, identity: Identity | None, ttl_s: float) -> None:
        now = self._clock()
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        self._cache[key] = (now + ttl_s, identity)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


def _key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
