"""What the kernel manager needs for compliance: audit records and per-kernel secrets.

:class:`Compliance` joins the :class:`~gateway.server.audit.AuditTrail` and the
:class:`~gateway.server.secrets.SecretResolver`; the kernel manager holds one as
``compliance`` and calls it at a few points (one line each in manager.py):

- ``@audited_start`` on ``start_kernel_for``: strict kernelspecs do not start while the audit
  log is unwritable; every start is recorded, and so is every refusal with its reason;
- :meth:`Compliance.prepare_secrets` right before the launch, and
  :meth:`Compliance.take_secret_env` when the kernel's own manager is made;
- :meth:`Compliance.ended` when a kernel is forgotten (stopped, died, gateway exit);
- :meth:`Compliance.note_died` when EG's restarter gives up on a kernel.

Handlers call :meth:`Compliance.note_stop_request` so a stop record names who asked, and
:meth:`Compliance.note_eviction` so that the end is recorded as an eviction with its reason.
Warm pools call :meth:`Compliance.prepare_secrets` and :meth:`Compliance.claimed` on a claim.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from .audit import AuditTrail
from .errors import GatewayError
from .identity import Identity
from .redaction import SecretValues
from .secrets import SecretResolver, declarations

log = logging.getLogger("kernelfleet.gateway")

StartMethod = TypeVar("StartMethod", bound=Callable[..., Awaitable[str]])


class Compliance:
    """Audit trail plus secrets for the kernel manager (see module docstring)."""

    def __init__(self, trail: AuditTrail | None = None, resolver: SecretResolver | None = None):
        self.trail = trail or AuditTrail(None)
        self.resolver = resolver
        self.shutting_down = False
        self._stop_requests: dict[str, str] = {}
        self._died: set[str] = set()
        self._evictions: dict[str, str] = {}
        self._secrets: dict[str, list[dict[str, str]]] = {}
        self._env: dict[str, dict[str, str]] = {}

    @property
    def values(self) -> SecretValues:
        """Secret values of running kernels (for redaction)."""
        return self.trail.values

    async def prepare_secrets(
        self, kernel_id: str, identity: Identity, kernel_name: str, spec: Mapping[str, Any] | None
    ) -> None:
        """Resolve the secrets of a kernel about to launch (GatewayError naming path, reason).

        The values stay here until :meth:`take_secret_env` hands them to that kernel's
        manager: they never travel in the start arguments, which EG keeps (and may persist).
        """
        if self.resolver is None:
            if spec is not None and _declares_secrets(spec):
                raise GatewayError(
                    500,
                    f"Kernel '{kernel_name}' needs secrets, and no secrets provider is "
                    "configured on the gateway.",
                    code="secret_config",
                )
            return
        resolved = await self.resolver.resolve(identity, kernel_name, spec)
        if not resolved.env:
            return
        self.values.add(kernel_id, resolved.env)
        self._secrets[kernel_id] = resolved.describe()
        self._env[kernel_id] = dict(resolved.env)
        log.info("Kernel %s gets secrets %r", kernel_id, resolved)

    def take_secret_env(self, kernel_id: str) -> dict[str, str]:
        """The secret env prepared for ``kernel_id`` (once; ``{}`` if none)."""
        return self._env.pop(kernel_id, {})

    async def started(
        self, kernel_id: str, identity: Identity, kernel_name: str, spec: Mapping[str, Any] | None
    ) -> None:
        """Record a start."""
        await self.trail.kernel_started(
            kernel_id, identity, kernel_name=kernel_name, spec=spec,
            secrets=self._secrets.pop(kernel_id, None),
        )  # fmt: skip

    async def claimed(
        self, kernel_id: str, identity: Identity, kernel_name: str, spec: Mapping[str, Any] | None
    ) -> None:
        """Record a warm kernel's claim by ``identity`` (call after its secrets are prepared)."""
        await self.trail.warm_claimed(
            kernel_id, identity, kernel_name=kernel_name, spec=spec,
            secrets=self._secrets.pop(kernel_id, None),
        )  # fmt: skip

    async def refused(
        self, identity: Identity, kernel_name: str, spec: Mapping[str, Any] | None,
        error: GatewayError,
    ) -> None:  # fmt: skip
        """Record a refused or failed start."""
        await self.trail.start_refused(identity, kernel_name=kernel_name, spec=spec, error=error)

    def note_stop_request(self, kernel_id: str, identity: Identity) -> None:
        """Remember who asked to stop ``kernel_id`` (for its stop record)."""
        self._stop_requests[kernel_id] = identity.name

    def note_died(self, kernel_id: str) -> None:
        """Remember that ``kernel_id`` died (EG's restarter gave up)."""
        self._died.add(kernel_id)

    def note_eviction(self, kernel_id: str, reason: str) -> None:
        """Remember that the scheduler evicts ``kernel_id`` (idle, lifetime, pressure...)."""
        self._evictions[kernel_id] = reason

    async def ended(self, kernel_id: str) -> None:
        """Record the end of ``kernel_id`` with why it ended; forget its secrets."""
        self._secrets.pop(kernel_id, None)
        self._env.pop(kernel_id, None)
        by = self._stop_requests.pop(kernel_id, "")
        if kernel_id in self._evictions:
            await self.trail.kernel_evicted(kernel_id, reason=self._evictions.pop(kernel_id))
            return
        if kernel_id in self._died:
            self._died.discard(kernel_id)
            reason = "died"
        elif by:
            reason = "shutdown"
        else:
            reason = "gateway_shutdown" if self.shutting_down else "shutdown"
        await self.trail.kernel_stopped(kernel_id, reason=reason, by=by)

    async def aclose(self) -> None:
        """Mark the exit in the chain, write what is buffered, close the provider."""
        await self.trail.gateway_stopping()
        if self.trail.sink is not None:
            await self.trail.sink.close()
        if self.resolver is not None:
            await self.resolver.aclose()


def _declares_secrets(spec: Mapping[str, Any]) -> bool:
    try:
        return bool(declarations(spec))
    except ValueError:
        return True


def audited_start(method: StartMethod) -> StartMethod:
    """Decorates ``start_kernel_for(self, identity, *, kernel_name, ...)``: audit every start.

    ``self`` must have ``compliance`` (a :class:`Compliance`) and ``_kernelspec_dict``.
    """

    @functools.wraps(method)
    async def start(self: Any, identity: Identity, *, kernel_name: str, **kwargs: Any) -> str:
        compliance: Compliance = self.compliance
        spec = self._kernelspec_dict(kernel_name)
        try:
            compliance.trail.check_may_start(kernel_name, spec)
            kernel_id = await method(self, identity, kernel_name=kernel_name, **kwargs)
        except GatewayError as e:
            await compliance.refused(identity, kernel_name, spec, e)
            raise
        claims = getattr(getattr(self, "warm", None), "claimed", set())
        if kernel_id in claims:
            claims.discard(kernel_id)
            await compliance.claimed(kernel_id, identity, kernel_name, spec)
        else:
            await compliance.started(kernel_id, identity, kernel_name, spec)
        return kernel_id

    return start  # type: ignore[return-value]
