"""The gateway's errors and its one JSON error shape.

Every error EG answers (with kernelfleet's handlers) is ``{"reason": <HTTP reason phrase>,
"message": <text for the user>}``, plus ``"error": <code>`` when kernelfleet knows one
(docs/contracts.md). A message never holds a token or a stack trace.
"""

from __future__ import annotations

import json
from http.client import responses
from typing import Any

from tornado import web

INTERNAL_ERROR_MESSAGE = (
    "Internal error in the kernelfleet gateway; an admin can find it in its log."
)


class GatewayError(web.HTTPError):
    """An error whose message is meant for the user (the notebook server shows it).

    ``status`` is the HTTP status, ``code`` a short label usable in metrics (``"quota_exceeded"``),
    ``message`` the text for the user, ``log_message`` what the gateway log gets (defaults to
    ``message``). Being a tornado ``HTTPError``, raising it from a handler logs one warning
    line (no traceback) and answers with :func:`error_body`.
    """

    def __init__(
        self, status: int, message: str, *, code: str = "", log_message: str | None = None
    ) -> None:
        # "%s" keeps tornado from %-formatting a message that holds a literal "%".
        super().__init__(status, "%s", log_message or message)
        self.code = code
        self.message = message

    @property
    def detail(self) -> str:
        """What the gateway's log says about this error (``log_message``, formatted)."""
        return str(self.log_message) % self.args if self.args else str(self.log_message)


def error_body(status: int, exc: BaseException | None) -> dict[str, Any]:
    """The JSON body for an error response with ``status`` caused by ``exc`` (if any)."""
    body: dict[str, Any] = {"reason": responses.get(status, "Unknown HTTP Error"), "message": ""}
    if isinstance(exc, GatewayError):
        body["message"] = exc.message
        if exc.code:
            body["error"] = exc.code
    elif isinstance(exc, web.HTTPError):
        body["message"] = _http_error_message(exc)
        if exc.reason:
            body["reason"] = exc.reason
    elif exc is not None:
        body["message"] = INTERNAL_ERROR_MESSAGE
    return body


def _http_error_message(exc: web.HTTPError) -> str:
    if not exc.log_message:
        return ""
    try:
        return exc.log_message % exc.args if exc.args else exc.log_message
    except (TypeError, ValueError):
        return exc.log_message


def error_json(status: int, exc: BaseException | None) -> str:
    """:func:`error_body` serialised."""
    return json.dumps(error_body(status, exc))
