"""The scheduler's HTTP API (docs/scheduler.md), as a FastAPI app built around a Scheduler.

Every ``/v1`` request needs ``Authorization: token <token>`` (401 otherwise): the service
token, or a user's hub API token (see :mod:`scheduler.auth`); the routes are in
:mod:`scheduler.api`.
Every error - the scheduler's own, unknown routes, wrong methods, invalid bodies - is
``{"error": code, "message": text}``; no stack trace ever reaches a client.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from . import models
from .api import v1_router
from .auth import SERVICE, Caller, TokenResolver, is_service_token
from .errors import SchedulerError, Unauthorized
from .eviction_api import eviction_router
from .metrics import CONTENT_TYPE, SchedulerMetrics
from .service import Scheduler
from .warm_api import warm_router

log = logging.getLogger(__name__)

API_PREFIX = "/v1"
_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": models.ErrorBody, "description": "missing or wrong token"},
    403: {"model": models.ErrorBody, "description": "forbidden for this caller"},
    422: {"model": models.ErrorBody, "description": "invalid request"},
    503: {"model": models.ErrorBody, "description": "Redis (or JupyterHub) is unreachable"},
}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def _error(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def _token_of(scope: Scope) -> str | None:
    """The token of an ``Authorization: token <t>`` (or ``Bearer <t>``) header."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() in ("token", "bearer") and token.strip():
                return token.strip()
    return None


class CallerAuth:
    """ASGI middleware: requests under ``/v1`` must carry the service token or, when a
    ``resolver`` is given, a user's JupyterHub API token; the caller goes to
    ``request.state.caller`` (see :mod:`scheduler.auth`)."""

    def __init__(self, app: ASGIApp, *, token: str, resolver: TokenResolver | None) -> None:
        self.app = app
        self._token = token
        self._resolver = resolver

    async def _caller(self, scope: Scope) -> Caller | None:
        token = _token_of(scope)
        if token is None:
            return None
        if is_service_token(token, self._token):
            return SERVICE
        if self._resolver is None:
            return None
        return await self._resolver.resolve(token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        protected = path == API_PREFIX or path.startswith(API_PREFIX + "/")
        if scope["type"] != "http" or not protected:
            await self.app(scope, receive, send)
            return
        try:
            found = await self._caller(scope)
        except SchedulerError as e:
            log.warning("authentication: %s", e.log_message)
            await _error(e.status, e.code, e.message)(scope, receive, send)
            return
        if found is None:
            error = Unauthorized(
                "Missing or wrong token: send 'Authorization: token <token>' with the token "
                "from secrets/scheduler_token in the state dir (or your JupyterHub API token)."
            )
            headers = {"WWW-Authenticate": "token"}
            response = _error(error.status, error.code, error.message, **headers)
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["caller"] = found
        await self.app(scope, receive, send)


def _validation_message(exc: RequestValidationError) -> str:
    """The first few validation problems as one line, without echoing input values."""
    parts = []
    for err in exc.errors()[:3]:
        if err.get("type") == "json_invalid":
            return "Invalid request: the body is not valid JSON."
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(parts) + "."


def _install_error_handlers(app: FastAPI) -> None:
    """Make every error use the one error shape."""

    async def scheduler_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SchedulerError)
        return _error(exc.status, exc.code, exc.message)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        if exc.status_code == 404:
            path = request.url.path
            message = f"No such endpoint: {path}. The API is described at /openapi.json."
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}."
        else:
            message = str(exc.detail)
        return _error(exc.status_code, code, message, **(exc.headers or {}))

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return _error(422, "invalid_request", _validation_message(exc))

    async def unexpected(request: Request, exc: Exception) -> Response:
        # Starlette re-raises after this answer, so the server logs the traceback once.
        log.error("unexpected %s on %s %s", type(exc).__name__, request.method, request.url.path)
        return _error(500, "internal_error", "The scheduler failed unexpectedly; see its log.")

    app.add_exception_handler(SchedulerError, scheduler_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)


def create_app(
    scheduler: Scheduler,
    *,
    token: str,
    metrics: SchedulerMetrics | None = None,
    resolver: TokenResolver | None = None,
) -> FastAPI:
    """The scheduler's ASGI app.

    ``token`` is the service token; ``resolver`` (optional) resolves users' hub tokens.
    ``metrics``, when given, replaces the scheduler's own (one registry per app).
    """
    if not token:
        raise ValueError("the service token must not be empty")
    if metrics is not None:
        scheduler.metrics = metrics
    app = FastAPI(
        title="kernelfleet scheduler",
        version="1",
        description="Admission, fair queues, leases, activity and usage of kernelfleet. /v1 "
        "needs 'Authorization: token <secrets/scheduler_token>' (or, for a user's own usage "
        "and queue position, their JupyterHub API token). Errors: {error, message}.",
    )
    _install_error_handlers(app)
    app.include_router(v1_router(scheduler), responses=_ERRORS)
    app.include_router(eviction_router(scheduler), responses=_ERRORS)
    app.include_router(warm_router(scheduler), responses=_ERRORS)

    @app.get("/healthz", response_model=models.HealthResponse, responses={503: _ERRORS[503]})
    async def healthz() -> models.HealthResponse:
        """200 when Redis answers, else 503 redis_unavailable."""
        await scheduler.ping()
        return models.HealthResponse()

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text; lease, pool and queue gauges are read from Redis on each scrape."""
        await scheduler.metrics.refresh(scheduler)
        return Response(scheduler.metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(CallerAuth, token=token, resolver=resolver)
    return app
