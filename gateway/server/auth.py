"""Hub-token authentication for every EG handler, JSON errors, and token-free request logs.

:class:`HubAuthMixin` goes first in the bases of every handler class the app serves (see
``handlers.kernelfleet_handler``). It replaces EG's shared-token check: ``prepare`` resolves
the caller's hub token into ``self.kf_identity`` or answers 401 ``{"reason", "message"}``.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tornado import web
from tornado.log import access_log

from .errors import error_body
from .identity import HubIdentityResolver, Identity, token_from_request

RESOLVER_SETTING = "kf_identity_resolver"
# Query parameters whose values never reach a log line.
SECRET_PARAMS = ("token", "auth", "key", "secret", "password")


class HubAuthMixin:
    """Authenticates each request with JupyterHub before the handler runs.

    Subclasses (handlers) read ``self.kf_identity`` (an :class:`Identity`, never None once
    ``prepare`` passed). CORS pre-flight ``OPTIONS`` requests are not authenticated.
    """

    kf_identity: Identity | None = None
    request: Any
    settings: dict[str, Any]

    async def prepare(self) -> None:
        if self.request.method != "OPTIONS":
            resolver: HubIdentityResolver = self.settings[RESOLVER_SETTING]
            token = token_from_request(
                self.request.headers.get("Authorization"),
                self.get_query_argument("token", None),  # type: ignore[attr-defined]
            )
            self.kf_identity = await resolver.resolve(token)
        result = super().prepare()  # type: ignore[misc]
        if result is not None:
            await result

    def get_current_user(self) -> str | None:
        return self.kf_identity.name if self.kf_identity else None

    @property
    def identity(self) -> Identity:
        """The verified caller (``prepare`` guarantees one)."""
        if self.kf_identity is None:
            raise web.HTTPError(401)
        return self.kf_identity

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc_info = kwargs.get("exc_info")
        body = error_body(status_code, exc_info[1] if exc_info else None)
        self.set_header("Content-Type", "application/json")  # type: ignore[attr-defined]
        self.finish(json.dumps(body))  # type: ignore[attr-defined]

    def _request_summary(self) -> str:
        # tornado logs this for every HTTPError; the stock one holds ?token= values.
        return f"{self.request.method} {scrub_uri(self.request.uri)} ({self.request.remote_ip})"


def scrub_uri(uri: str) -> str:
    """``uri`` with the values of secret-looking query parameters replaced by ``[secret]``."""
    parts = urlsplit(uri)
    if not parts.query:
        return uri
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    scrubbed = [
        (k, "[secret]" if any(s in k.lower() for s in SECRET_PARAMS) else v) for k, v in pairs
    ]
    return urlunsplit(parts._replace(query=urlencode(scrubbed, safe="[]")))


def log_request(handler: web.RequestHandler) -> None:
    """Access log line per request (tornado's ``log_function``), without tokens."""
    status = handler.get_status()
    if status < 400:
        log_method = access_log.info
    elif status < 500:
        log_method = access_log.warning
    else:
        log_method = access_log.error
    request = handler.request
    log_method(
        "%d %s %s (%s) %.2fms",
        status,
        request.method,
        scrub_uri(request.uri or ""),
        request.remote_ip,
        1000.0 * request.request_time(),
    )
