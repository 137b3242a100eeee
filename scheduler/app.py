"""The scheduler's HTTP API (docs/contracts.md), as a FastAPI app built around a Scheduler.

Every ``/v1`` request needs ``Authorization: token <service token>`` (401 otherwise).
Every error - the scheduler's own, unknown routes, wrong methods, invalid bodies - is
``{"error": code, "message": text}``; no stack trace ever reaches a client.
"""

from __future__ import annotations

import hmac
import logging
import time

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from . import models
from .errors import RedisUnavailable, SchedulerError, Unauthorized
from .metrics import CONTENT_TYPE, SchedulerMetrics
from .service import Scheduler

log = logging.getLogger(__name__)

API_PREFIX = "/v1"
_ERRORS = {
    401: {"model": models.ErrorBody, "description": "missing or wrong service token"},
    422: {"model": models.ErrorBody, "description": "invalid request"},
    503: {"model": models.ErrorBody, "description": "Redis is unreachable"},
}
_ADMISSION_ERRORS = {
    403: {"model": models.ErrorBody, "description": "quota_exceeded, kernelspec_forbidden"},
    404: {"model": models.ErrorBody, "description": "unknown_kernelspec"},
    409: {"model": models.ErrorBody, "description": "pool_full, lease_conflict"},
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


class TokenAuth:
    """ASGI middleware: requests under ``/v1`` must carry the service token."""

    def __init__(self, app: ASGIApp, *, token: str) -> None:
        self.app = app
        self._token = token.encode()

    def _allowed(self, scope: Scope) -> bool:
        token = _token_of(scope)
        return token is not None and hmac.compare_digest(token.encode(), self._token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        protected = path == API_PREFIX or path.startswith(API_PREFIX + "/")
        if scope["type"] == "http" and protected and not self._allowed(scope):
            error = Unauthorized(
                "Missing or wrong service token: send 'Authorization: token <token>' "
                "with the token from secrets/scheduler_token in the state dir."
            )
            headers = {"WWW-Authenticate": "token"}
            response = _error(error.status, error.code, error.message, **headers)
            await response(scope, receive, send)
            return
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


def _v1_router(scheduler: Scheduler, metrics: SchedulerMetrics) -> APIRouter:
    """The authenticated API: admissions, leases, pools."""
    router = APIRouter(prefix=API_PREFIX, responses=_ERRORS)

    @router.post(
        "/admissions", status_code=201, responses=_ADMISSION_ERRORS,
        response_model=models.AdmissionResponse,
    )  # fmt: skip
    async def admit(body: models.AdmissionRequest) -> models.AdmissionResponse:
        """Admit a kernel (atomically: quota, pool capacity, GPU devices) or refuse.

        Admitting the same kernel_id again returns the same lease (idempotent).
        """
        start = time.perf_counter()
        try:
            admission = await scheduler.admitter.admit(
                kernel_id=body.kernel_id, user=body.user, groups=body.groups,
                kernelspec=body.kernelspec, admin=body.admin,
            )  # fmt: skip
        except SchedulerError as e:
            decision = "error" if isinstance(e, RedisUnavailable) else "refused"
            metrics.admission(decision, e.code)
            log.info("refused kernel %s of %s (%s): %s", body.kernel_id, body.user,
                     body.kernelspec, e.log_message)  # fmt: skip
            raise
        finally:
            metrics.admission_seconds.observe(time.perf_counter() - start)
        metrics.admission("admitted", "new" if admission.created else "existing")
        return models.AdmissionResponse(lease=admission.lease, env=admission.env)

    @router.delete("/leases/{kernel_id}", response_model=models.ReleaseResponse)
    async def release(kernel_id: models.KernelId) -> models.ReleaseResponse:
        """Release a kernel's lease and what it holds; ``released: false`` if none."""
        return models.ReleaseResponse(released=await scheduler.leases.release(kernel_id))

    @router.get("/leases", response_model=models.LeasesResponse)
    async def list_leases(
        user: str | None = None, pool: str | None = None, kernelspec: str | None = None
    ) -> models.LeasesResponse:
        """Leases, oldest first, filtered by user, pool and kernelspec."""
        found = await scheduler.leases.list(user=user, pool=pool, kernelspec=kernelspec)
        return models.LeasesResponse(leases=found)

    @router.get("/pools", response_model=models.PoolsResponse)
    async def pools() -> models.PoolsResponse:
        """Every pool: capacity (overcommit applied), what is used, simulated GPUs, cost."""
        statuses = await scheduler.pool_status()
        return models.PoolsResponse.model_validate({"pools": [s.as_json() for s in statuses]})

    return router


def create_app(
    scheduler: Scheduler, *, token: str, metrics: SchedulerMetrics | None = None
) -> FastAPI:
    """The scheduler's ASGI app; ``token`` is the service token every /v1 call must send."""
    if not token:
        raise ValueError("the service token must not be empty")
    metrics = metrics or SchedulerMetrics()
    app = FastAPI(
        title="kernelfleet scheduler",
        version="1",
        description="Admission, leases and pools of kernelfleet. /v1 needs "
        "'Authorization: token <secrets/scheduler_token>'. Errors: {error, message}.",
    )
    _install_error_handlers(app)
    app.include_router(_v1_router(scheduler, metrics))

    @app.get("/healthz", response_model=models.HealthResponse, responses={503: _ERRORS[503]})
    async def healthz() -> models.HealthResponse:
        """200 when Redis answers, else 503 redis_unavailable."""
        await scheduler.ping()
        return models.HealthResponse()

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text; lease and pool gauges are read from Redis on each scrape."""
        await metrics.refresh(scheduler)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(TokenAuth, token=token)
    return app
