"""Reconciliation: leases against the kernels Enterprise Gateway actually runs.

Each round lists EG's kernels (``GET /api/kernels`` with the gateway's service token, an
admin identity that sees every kernel) and compares them with the live leases:

- a **lease without a kernel** (the gateway crashed before releasing it, a release was
  lost) is released once it has been missing for ``lease_grace_s`` - and only if it is
  older than ``launch_timeout_s``, since EG lists a kernel only once it has started;
- a **kernel without a lease** (Redis lost data, a kernel started around the scheduler)
  is shut down through EG once it has been seen without a lease for ``kernel_grace_s``.

Both are logged and counted (``reconcile_fixes_total``). When EG cannot be asked, the round
is skipped: nothing is released or stopped on a guess. First-seen times live in Redis, so
a restarted scheduler neither forgets nor restarts the graces. Kernels of users whose
GPU-hours reached their quota are stopped here too (:meth:`Reconciler.enforce_gpu_hours`).
The decisions are a pure function, :func:`plan`, tested without Redis or EG.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from . import keys, messages
from .errors import GatewayUnavailable
from .service import Scheduler
from .store import unavailable_as

log = logging.getLogger(__name__)

LEASE_GRACE_S = 30.0
KERNEL_GRACE_S = 60.0


class KernelGateway(Protocol):
    """What reconciliation needs from Enterprise Gateway."""

    async def kernel_ids(self) -> set[str]:
        """Ids of every kernel EG runs; GatewayUnavailable if it cannot say."""
        ...

    async def shutdown(self, kernel_id: str) -> None:
        """Stop a kernel (gone already is fine); GatewayUnavailable if that failed."""
        ...


class EnterpriseGatewayClient:
    """EG's kernels API at ``url`` with the gateway's hub service token (an admin)."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.AsyncClient(
            timeout=timeout_s, transport=transport, headers={"Authorization": f"token {token}"}
        )

    async def _call(self, method: str, path: str) -> httpx.Response:
        try:
            return await self._client.request(method, f"{self.url}{path}")
        except httpx.HTTPError as e:
            raise GatewayUnavailable(
                f"Enterprise Gateway at {self.url} is unreachable.",
                log_message=f"{method} {self.url}{path}: {type(e).__name__}",
            ) from e

    async def kernel_ids(self) -> set[str]:
        # include=warm: warm-pool kernels have no owner but hold leases
        response = await self._call("GET", "/api/kernels?include=warm")
        body: Any = response.json() if response.status_code == 200 else None
        if not isinstance(body, list):
            raise GatewayUnavailable(
                f"Enterprise Gateway at {self.url} did not list its kernels "
                f"(HTTP {response.status_code})."
            )
        return {k["id"] for k in body if isinstance(k, dict) and isinstance(k.get("id"), str)}

    async def shutdown(self, kernel_id: str) -> None:
        response = await self._call("DELETE", f"/api/kernels/{kernel_id}")
        if response.status_code not in (200, 204, 404):
            raise GatewayUnavailable(
                f"Enterprise Gateway at {self.url} did not stop kernel {kernel_id} "
                f"(HTTP {response.status_code})."
            )

    async def notice(self, kernel_id: str, text: str) -> int:
        """Show ``text`` to the kernel's clients (see gateway.server.eviction_notice);
        how many got it now (0: held for the first client). GatewayUnavailable if refused."""
        try:
            response = await self._client.post(
                f"{self.url}/kernelfleet/kernels/{kernel_id}/notice", json={"text": text}
            )
        except httpx.HTTPError as e:
            raise GatewayUnavailable(
                f"Enterprise Gateway at {self.url} is unreachable.",
                log_message=f"notice {kernel_id}: {type(e).__name__}",
            ) from e
        if response.status_code != 200:
            raise GatewayUnavailable(
                f"Enterprise Gateway at {self.url} refused a notice for kernel {kernel_id} "
                f"(HTTP {response.status_code})."
            )
        return int(response.json().get("delivered", 0))

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


@dataclass(frozen=True)
class Plan:
    """What one round does, and the first-seen times to remember for the next."""

    release: list[str] = field(default_factory=list)
    shutdown: list[str] = field(default_factory=list)
    missing: dict[str, float] = field(default_factory=dict)
    orphans: dict[str, float] = field(default_factory=dict)


def plan(
    *,
    leases: Mapping[str, float],
    kernels: set[str],
    missing: Mapping[str, float],
    orphans: Mapping[str, float],
    now: float,
    listed_at: float,
    lease_grace_s: float = LEASE_GRACE_S,
    kernel_grace_s: float = KERNEL_GRACE_S,
    launch_timeout_s: float = 60.0,
) -> Plan:
    """Decide a round. ``leases``: kernel id -> created (unix s) of live leases;
    ``kernels``: what EG listed at ``listed_at``; ``missing``/``orphans``: first-seen times
    from earlier rounds (leases without a kernel, kernels without a lease)."""
    result = Plan()
    for kernel_id, created in sorted(leases.items()):
        if kernel_id in kernels or created > listed_at - launch_timeout_s:
            continue  # running, or possibly still launching
        first = missing.get(kernel_id, now)
        if now - first >= lease_grace_s:
            result.release.append(kernel_id)
        else:
            result.missing[kernel_id] = first
    for kernel_id in sorted(kernels - set(leases)):
        first = orphans.get(kernel_id, now)
        if now - first >= kernel_grace_s:
            result.shutdown.append(kernel_id)
        else:
            result.orphans[kernel_id] = first
    return result


@dataclass(frozen=True)
class Round:
    """What a round did."""

    released: list[str] = field(default_factory=list)
    shut_down: list[str] = field(default_factory=list)
    skipped: bool = False


class Reconciler:
    """Runs reconciliation rounds for ``scheduler`` against ``gateway``."""

    def __init__(
        self,
        scheduler: Scheduler,
        gateway: KernelGateway,
        *,
        lease_grace_s: float = LEASE_GRACE_S,
        kernel_grace_s: float = KERNEL_GRACE_S,
        launch_timeout_s: float | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.gateway = gateway
        self.lease_grace_s = lease_grace_s
        self.kernel_grace_s = kernel_grace_s
        self.launch_timeout_s = (
            launch_timeout_s if launch_timeout_s is not None else scheduler.admitter.max_wait_s
        )
        self._skipping = False

    async def run_once(self) -> Round:
        """One round: list, compare, fix, remember first-seen times."""
        metrics = self.scheduler.metrics
        try:
            kernels = await self.gateway.kernel_ids()
        except GatewayUnavailable as e:
            # one warning when EG stops answering, not one per round
            (log.info if self._skipping else log.warning)(
                "reconciliation skipped: %s", e.log_message
            )
            self._skipping = True
            metrics.reconcile_runs.labels(outcome="skipped").inc()
            return Round(skipped=True)
        if self._skipping:
            log.info("reconciliation: Enterprise Gateway answers again")
            self._skipping = False
        listed_at = self.scheduler.clock()
        leases = {lease.kernel_id: lease.created for lease in await self.scheduler.leases.list()}
        missing, orphans = await self._first_seen()
        decided = plan(
            leases=leases, kernels=kernels, missing=missing, orphans=orphans,
            now=self.scheduler.clock(), listed_at=listed_at, lease_grace_s=self.lease_grace_s,
            kernel_grace_s=self.kernel_grace_s, launch_timeout_s=self.launch_timeout_s,
        )  # fmt: skip
        released = [k for k in decided.release if await self._release(k)]
        shut_down, failed = [], {}
        for kernel_id in decided.shutdown:
            if await self._shutdown(kernel_id):
                shut_down.append(kernel_id)
            else:
                failed[kernel_id] = orphans.get(kernel_id, listed_at)
        await self._remember(decided.missing, {**decided.orphans, **failed})
        metrics.reconcile_runs.labels(outcome="ok").inc()
        return Round(released=released, shut_down=shut_down)

    async def _release(self, kernel_id: str) -> bool:
        if not await self.scheduler.release(kernel_id, reason="reconciled"):
            return False
        log.warning("reconciliation: released the lease of kernel %s: EG does not run it",
                    kernel_id)  # fmt: skip
        self.scheduler.metrics.reconcile_fixes.labels(kind="lease_released").inc()
        return True

    async def _shutdown(self, kernel_id: str) -> bool:
        try:
            await self.gateway.shutdown(kernel_id)
        except GatewayUnavailable as e:
            log.warning("reconciliation: could not stop kernel %s: %s", kernel_id,
                        e.log_message)  # fmt: skip
            return False
        log.warning("reconciliation: stopped kernel %s: it held no lease", kernel_id)
        self.scheduler.metrics.reconcile_fixes.labels(kind="kernel_shutdown").inc()
        return True

    async def _first_seen(self) -> tuple[dict[str, float], dict[str, float]]:
        redis = self.scheduler.redis
        with unavailable_as(self.scheduler.location):
            missing = await redis.zrange(keys.RECONCILE_MISSING, 0, -1, withscores=True)
            orphans = await redis.zrange(keys.RECONCILE_ORPHANS, 0, -1, withscores=True)
        return dict(missing), dict(orphans)

    async def _remember(self, missing: dict[str, float], orphans: dict[str, float]) -> None:
        with unavailable_as(self.scheduler.location):
            pipe = self.scheduler.redis.pipeline(transaction=True)
            pipe.delete(keys.RECONCILE_MISSING, keys.RECONCILE_ORPHANS)
            if missing:
                pipe.zadd(keys.RECONCILE_MISSING, missing)
            if orphans:
                pipe.zadd(keys.RECONCILE_ORPHANS, orphans)
            await pipe.execute()

    async def enforce_gpu_hours(self) -> list[str]:
        """Stop the GPU kernels of users whose GPU-hours reached their quota."""
        stopped = []
        for over in await self.scheduler.usage.over_gpu_hours():
            reason = messages.gpu_hours_evicted(used_s=over.used_s, limit_s=over.limit_s)
            for kernel_id in over.kernel_ids:
                if not await self._shutdown_for_quota(kernel_id, over.user, reason):
                    continue
                await self.scheduler.release(kernel_id, reason="gpu_hours_exhausted")
                self.scheduler.metrics.evictions.labels(reason="gpu_hours_exhausted").inc()
                stopped.append(kernel_id)
        return stopped

    async def _shutdown_for_quota(self, kernel_id: str, user: str, reason: str) -> bool:
        try:
            await self.gateway.shutdown(kernel_id)
        except GatewayUnavailable as e:
            log.warning("could not stop kernel %s of %s over GPU-hours: %s", kernel_id, user,
                        e.log_message)  # fmt: skip
            return False
        log.warning("stopped kernel %s of %s: %s", kernel_id, user, reason)
        return True
