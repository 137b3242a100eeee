"""Gateway errors, shown to the user with the gateway's own words.

jupyter-server 2.21's ``gateway_request`` turns an HTTP error from the gateway into
``web.HTTPError(code, "Error from Gateway: [%s] %s. Ensure gateway url is valid...",
message, reason)``, and ``APIHandler.write_error`` replies with the *unformatted*
``log_message``: the user reads ``[%s] %s`` instead of "You already have 3 of 3 kernels
running". ``POST /api/sessions`` is worse: it re-wraps every error as a 500.

The fix lives here, not in site-packages: the kernels, sessions, kernelspecs and status
API handlers are re-registered with `GatewayErrorsMixin`, whose ``write_error`` walks the
exception chain back to the gateway's HTTP response and replies with the gateway's
status and ``{"message": <gateway message verbatim>, "reason": <gateway reason>}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http.client import responses
from typing import Any

from jupyter_server.base.handlers import APIHandler
from jupyter_server.services.api.handlers import APIStatusHandler
from jupyter_server.services.kernels import handlers as kernel_handlers
from jupyter_server.services.kernelspecs import handlers as kernelspec_handlers
from jupyter_server.services.sessions import handlers as session_handlers
from jupyter_server.utils import url_path_join
from tornado import web
from tornado.httpclient import HTTPClientError

#: A gateway 401 means *our* credentials were refused upstream; answering 401 to the
#: browser would claim the browser's login to this notebook server expired.
_REMAPPED_STATUS = {401: 502, 599: 504}
_MAX_BODY_CHARS = 2000


@dataclass(frozen=True)
class GatewayRefusal:
    """An error answer from the gateway, as the user should see it.

    ``status`` is the HTTP status to reply with, ``reason`` a short label (usable as a
    metrics label), ``message`` the human text, verbatim from the gateway when it sent one.
    """

    status: int
    reason: str
    message: str

    def to_json(self) -> str:
        """The body of the reply: jupyter-server's API error shape."""
        return json.dumps({"message": self.message, "reason": self.reason})


def refusal_from_response(code: int, body: bytes | None, *, fallback: str) -> GatewayRefusal:
    """Build the refusal for a gateway answer with status ``code`` and ``body``.

    EG answers ``{"reason": ..., "message": ...}`` but is not consistent about where the
    human text goes: ``web.HTTPError(403, text)`` fills ``message``, its process proxies'
    ``HTTPError(403, reason=text)`` leave ``message`` empty and put the text in ``reason``.
    The text is kept verbatim either way, and ``reason`` stays a short label. A plain-text
    body becomes the message (trimmed); with no usable text ``fallback`` is used.
    """
    status = _REMAPPED_STATUS.get(code, code)
    standard = responses.get(code, "Gateway error")
    message, reason = "", standard
    text = (body or b"").decode("utf-8", errors="replace").strip()
    try:
        payload = json.loads(text) if text else None
    except ValueError:  # plain text is kept; an HTML error page (a proxy's) is not
        payload, message = None, "" if text.startswith("<") else text[:_MAX_BODY_CHARS]
    if isinstance(payload, dict):
        said = str(payload.get("message") or "").strip()
        label = str(payload.get("reason") or "").strip()
        if said:
            message, reason = said, label or standard
        elif label and label != standard:
            message = label
    return GatewayRefusal(status=status, reason=reason, message=message or fallback)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes, outermost first (``__cause__``, else ``__context__``)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def refusal_from(exc: BaseException) -> GatewayRefusal | None:
    """The gateway refusal that caused ``exc``, or None when the gateway did not refuse.

    Follows the exception chain because jupyter-server wraps the HTTP client error once
    (``gateway_request``) and ``POST /api/sessions`` wraps it again (as a 500).
    """
    for error in _chain(exc):
        if isinstance(error, HTTPClientError):
            body = error.response.body if error.response is not None else None
            return refusal_from_response(error.code, body, fallback=_describe(error))
    return None


def _describe(error: HTTPClientError) -> str:
    """A message for a gateway error without a usable body (e.g. a timeout, code 599)."""
    if error.code == 599:
        return f"The gateway did not answer: {error.message}"
    return f"The gateway answered {error.code}: {error.message}"


def _innermost_http_error(exc: BaseException) -> web.HTTPError | None:
    """The deepest ``web.HTTPError`` in the chain: the original one, before re-wrapping."""
    found = [error for error in _chain(exc) if isinstance(error, web.HTTPError)]
    return found[-1] if found else None


def formatted_message(error: web.HTTPError) -> str:
    """``error.log_message % error.args``, tolerating messages that are not templates."""
    if not error.log_message:
        return responses.get(error.status_code, "Unknown HTTP Error")
    if not error.args:
        return error.log_message
    try:
        return error.log_message % error.args
    except (TypeError, ValueError):
        return error.log_message


class GatewayErrorsMixin:
    """Mix into an `APIHandler`: errors caused by the gateway reply in the gateway's words.

    Overrides ``write_error`` only; everything else (auth, routes, methods) is the stock
    handler's. Non-gateway ``HTTPError``\\ s get their message formatted with their args.
    """

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Reply with the gateway's status and message when the gateway refused."""
        handler: APIHandler = self  # type: ignore[assignment]
        exc_info = kwargs.get("exc_info")
        error = exc_info[1] if exc_info else None
        refusal = refusal_from(error) if error is not None else None
        http_error = _innermost_http_error(error) if error is not None else None
        if refusal is None and http_error is not None:
            status = http_error.status_code
            refusal = GatewayRefusal(
                status=status,
                reason=http_error.reason or responses.get(status, "Unknown HTTP Error"),
                message=formatted_message(http_error),
            )
        if refusal is None:
            super().write_error(status_code, **kwargs)  # type: ignore[misc]
            return
        handler.set_status(refusal.status)
        handler.set_header("Content-Type", "application/json")
        handler.log.warning("API error %s: %s", refusal.status, refusal.message)
        handler.finish(refusal.to_json())


def _with_gateway_errors(handler_class: type[APIHandler]) -> type[APIHandler]:
    """A subclass of ``handler_class`` that reports gateway errors verbatim."""
    name = f"Gateway{handler_class.__name__}"
    return type(name, (GatewayErrorsMixin, handler_class), {"__module__": __name__})


def _gateway_backed_routes() -> list[tuple[str, type[APIHandler]]]:
    """The server's REST routes whose handlers call the gateway."""
    routes = [(r"/api/status", APIStatusHandler)]  # counts kernels via the gateway
    for module in (kernel_handlers, session_handlers, kernelspec_handlers):
        for pattern, handler_class in module.default_handlers:
            if isinstance(handler_class, type) and issubclass(handler_class, APIHandler):
                routes.append((pattern, handler_class))
    return routes


def gateway_error_handlers(base_url: str) -> list[tuple[str, type[APIHandler]]]:
    """Gateway-backed REST routes (kernels, sessions, kernelspecs, status), errors fixed.

    Added by an extension, these routes take precedence over the server's own ones
    (tornado consults rules added with ``add_handlers`` before the initial ones).
    Websocket routes are left alone.
    """
    return [
        (url_path_join(base_url, pattern), _with_gateway_errors(handler_class))
        for pattern, handler_class in _gateway_backed_routes()
    ]
