"""Kernelfleet's behaviour for EG's REST handlers, composed onto EG's own classes.

:func:`kernelfleet_handler` turns each handler class EG serves into
``(HubAuthMixin, <override mixin, if any>, <EG class>)``. The override mixins:

- kernels: listing shows the caller's kernels (admins: all) and is always enabled; starting
  goes through the kernel manager's ``start_kernel_for`` with a sanitised env; get, delete,
  interrupt, restart and channels on a kernel that is not yours are 404;
- kernelspecs: only curated kernelspecs the caller's groups may use are visible;
- sessions: disabled (notebook servers keep their own sessions and use ``/api/kernels``);
  listing answers ``[]`` so that pollers do not break.
"""

from __future__ import annotations

import json
from typing import Any

from jupyter_client.jsonutil import date_default
from jupyter_server.services.kernelspecs.handlers import kernelspec_model
from jupyter_server.utils import ensure_async, url_escape, url_path_join, url_unescape
from tornado import web

from .audit_channels import AuditChannelsMixin
from .auth import HubAuthMixin
from .channels import ChannelsMixin
from .errors import GatewayError
from .policy import USERNAME_VAR, may_use, sanitize_client_env

SESSIONS_DISABLED = (
    "The sessions API is disabled on the kernelfleet gateway; start kernels with POST /api/kernels."
)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object (empty body: ``{}``); 400 with a clear message if not."""
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise GatewayError(400, f"Request body is not valid JSON: {e}", code="bad_json") from e
    if not isinstance(value, dict):
        raise GatewayError(400, "Request body must be a JSON object.", code="bad_json")
    return value


class KernelAccessMixin:
    """``require_kernel_access``: 404 unless the caller owns the kernel or is an admin."""

    kernel_manager: Any
    identity: Any

    def require_kernel_access(self, kernel_id: str) -> None:
        if not self.kernel_manager.may_access(kernel_id, self.identity):
            raise GatewayError(404, f"Kernel does not exist: {kernel_id}", code="unknown_kernel")


class KernelCollectionMixin(KernelAccessMixin):
    """``GET/POST /api/kernels``."""

    log: Any
    base_url: str
    request: Any

    async def get(self) -> None:
        km = self.kernel_manager
        models = [m for m in km.list_kernels() if km.may_access(m["id"], self.identity)]
        if self.identity.admin and self.get_query_argument("include", "") == "warm":  # type: ignore[attr-defined]
            # the scheduler's reconciliation: warm kernels hold leases too
            models += [dict(m, warm=True) for m in km.list_kernels() if km.warm.is_warm(m["id"])]
        self.finish(json.dumps(models, default=date_default))  # type: ignore[attr-defined]

    async def post(self) -> None:
        model = parse_json_object(self.request.body)
        km = self.kernel_manager
        name = model.get("name") or km.default_kernel_name
        if not isinstance(name, str):
            raise GatewayError(400, "'name' must be a kernelspec name (a string).", code="bad_name")
        client_env = model.get("env") or {}
        if not isinstance(client_env, dict):
            raise GatewayError(400, "'env' must be a JSON object of strings.", code="bad_env")
        kept, dropped = sanitize_client_env(client_env)
        if dropped:
            self.log.info("Ignoring client-set %s for %s", ", ".join(dropped), self.identity.name)
        if client_env.get(USERNAME_VAR, self.identity.name) != self.identity.name:
            self.log.info("Ignoring client-set %s; using %s", USERNAME_VAR, self.identity.name)
        kernel_id = await km.start_kernel_for(
            self.identity,
            kernel_name=name,
            env=self._build_kernel_env(kept),  # type: ignore[attr-defined]
            kernel_headers=self._build_kernel_headers(),  # type: ignore[attr-defined]
            # a queued start whose client gave up leaves the queue
            client_gone=lambda: self.request.connection.stream.closed(),  # type: ignore[attr-defined]
        )
        location = url_path_join(self.base_url, "api", "kernels", url_escape(kernel_id))
        self.set_header("Location", location)  # type: ignore[attr-defined]
        self.set_status(201)  # type: ignore[attr-defined]
        self.finish(json.dumps(km.kernel_model(kernel_id), default=date_default))  # type: ignore[attr-defined]


class KernelResourceMixin(KernelAccessMixin):
    """``GET/DELETE /api/kernels/{id}``."""

    async def get(self, kernel_id: str) -> None:
        self.require_kernel_access(kernel_id)
        model = self.kernel_manager.kernel_model(kernel_id)
        self.finish(json.dumps(model, default=date_default))  # type: ignore[attr-defined]

    async def delete(self, kernel_id: str) -> None:
        self.require_kernel_access(kernel_id)
        self.kernel_manager.compliance.note_stop_request(kernel_id, self.identity)
        await self.kernel_manager.shutdown_kernel(kernel_id)
        self.set_status(204)  # type: ignore[attr-defined]
        self.finish()  # type: ignore[attr-defined]


class KernelActionMixin(KernelAccessMixin):
    """``POST /api/kernels/{id}/interrupt|restart``, without tracebacks in answers."""

    log: Any

    async def post(self, kernel_id: str, action: str) -> None:
        self.require_kernel_access(kernel_id)
        km = self.kernel_manager
        if action == "interrupt":
            await ensure_async(km.interrupt_kernel(kernel_id))
            self.set_status(204)  # type: ignore[attr-defined]
            self.finish()  # type: ignore[attr-defined]
            return
        try:
            await km.restart_kernel(kernel_id)
        except web.HTTPError:
            raise
        except Exception as e:
            self.log.exception("Restarting kernel %s failed", kernel_id)
            raise GatewayError(
                500, "The kernel could not be restarted.", code="restart_failed"
            ) from e
        self.finish(json.dumps(km.kernel_model(kernel_id), default=date_default))  # type: ignore[attr-defined]


class ChannelsAccessMixin(KernelAccessMixin, AuditChannelsMixin, ChannelsMixin):
    """The channels websocket (see ``channels.ChannelsMixin``, ``audit_channels``)."""


class KernelSpecListMixin:
    """``GET /api/kernelspecs``: the curated kernelspecs the caller may use."""

    settings: dict[str, Any]
    identity: Any
    kernel_manager: Any

    async def get(self) -> None:
        specs = await ensure_async(self.settings["kernel_spec_cache"].get_all_specs())
        visible = {}
        for name, info in sorted(specs.items()):
            if may_use(self.identity, info["spec"]):
                visible[name] = kernelspec_model(self, name, info["spec"], info["resource_dir"])
        default = self.kernel_manager.default_kernel_name
        if default not in visible and visible:
            default = next(iter(visible))
        self.set_header("Content-Type", "application/json")  # type: ignore[attr-defined]
        self.finish(json.dumps({"default": default, "kernelspecs": visible}))  # type: ignore[attr-defined]


async def visible_kernelspec(handler: Any, kernel_name: str) -> Any:
    """The KernelSpec ``kernel_name`` if the caller may use it, else 404 naming it."""
    try:
        spec = await ensure_async(
            handler.settings["kernel_spec_cache"].get_kernel_spec(kernel_name)
        )
    except KeyError:
        spec = None
    if spec is None or not may_use(handler.identity, spec.to_dict()):
        raise GatewayError(404, f"Kernelspec '{kernel_name}' not found.", code="unknown_kernelspec")
    return spec


class KernelSpecMixin:
    """``GET /api/kernelspecs/{name}``: 404 unless visible to the caller."""

    async def get(self, kernel_name: str) -> None:
        kernel_name = url_unescape(kernel_name)
        spec = await visible_kernelspec(self, kernel_name)
        model = kernelspec_model(self, kernel_name, spec.to_dict(), spec.resource_dir)
        self.set_header("Content-Type", "application/json")  # type: ignore[attr-defined]
        self.finish(json.dumps(model))  # type: ignore[attr-defined]


class KernelSpecResourceMixin:
    """``GET /kernelspecs/{name}/{file}`` (logos): 404 unless the kernelspec is visible."""

    async def get(self, kernel_name: str, path: str, include_body: bool = True) -> None:
        await visible_kernelspec(self, url_unescape(kernel_name))
        await super().get(kernel_name, path, include_body=include_body)  # type: ignore[misc]


class SessionsDisabledMixin:
    """``/api/sessions[/{id}]``: list is ``[]``, a session is 404, changes are 403."""

    async def get(self, session_id: str | None = None) -> None:
        if session_id:
            raise GatewayError(404, f"Session not found: {session_id}", code="unknown_session")
        self.finish("[]")  # type: ignore[attr-defined]

    async def post(self, session_id: str | None = None) -> None:
        raise GatewayError(403, SESSIONS_DISABLED, code="sessions_disabled")

    patch = post
    delete = post


OVERRIDES: dict[str, type] = {
    "MainKernelHandler": KernelCollectionMixin,
    "KernelHandler": KernelResourceMixin,
    "KernelActionHandler": KernelActionMixin,
    "ZMQChannelsHandler": ChannelsAccessMixin,
    "MainKernelSpecHandler": KernelSpecListMixin,
    "KernelSpecHandler": KernelSpecMixin,
    "KernelSpecResourceHandler": KernelSpecResourceMixin,
    "SessionRootHandler": SessionsDisabledMixin,
    "SessionHandler": SessionsDisabledMixin,
}


def kernelfleet_handler(cls: type) -> type:
    """``cls`` (an EG handler class) with hub authentication and kernelfleet's override, if any."""
    override = OVERRIDES.get(cls.__name__)
    bases = (HubAuthMixin, override, cls) if override else (HubAuthMixin, cls)
    doc = f"EG's {cls.__name__} with kernelfleet's hub authentication and access rules."
    return type(cls.__name__, bases, {"__module__": __name__, "__doc__": doc})


def kernelfleet_handlers(handlers: list[tuple]) -> list[tuple]:
    """EG's handler table with every class wrapped; fails if an override found no handler.

    A missing override would silently lose an access rule (an EG upgrade renaming a class),
    so that is an error at start-up, not a warning.
    """
    wrapped = [(pattern, kernelfleet_handler(cls), *rest) for pattern, cls, *rest in handlers]
    seen = {cls.__name__ for _, cls, *_ in handlers}
    missing = sorted(set(OVERRIDES) - seen)
    if missing:
        raise RuntimeError(f"EG serves no handler named {', '.join(missing)}; refusing to start")
    return wrapped
