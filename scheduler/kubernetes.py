"""The scheduler on Kubernetes (``backend: kubernetes``): one object started and stopped as one.

:meth:`KubernetesBackend.start` connects (in-cluster service account, else $KUBECONFIG) and
reads the pools' capacity from their nodes before the scheduler serves. Then
:meth:`~KubernetesBackend.attach` starts three loops next to the HTTP API:

- :class:`~scheduler.kubernetes_nodes.NodeWatch`: pool capacity follows the nodes labelled
  ``kernelfleet.io/pool=<pool>`` (allocatable cpu, memory, nvidia.com/gpu);
- :class:`~scheduler.kubernetes_pods.PodWatch`: a kernel pod Pending past its limit, or whose
  image cannot be pulled, fails its start at once with a message saying which (recorded for
  ``GET /v1/start-failures/{kernel_id}``), its lease is released and its pod deleted;
- :class:`~scheduler.kubernetes_warm.PlaceholderScaler`: placeholder pods per pool follow the
  warm targets.

A claimed warm kernel's pod is relabelled as its user's (``kernelfleet.io/owner``, and
``kernelfleet.io/warm: "false"``), in the background: the claim does not wait for it.

Admissions also hand the kernel its placement (``KERNEL_CPUS``, ``KERNEL_MEMORY`` in bytes,
``KERNEL_GPUS``), which the kernel pod template turns into requests and limits.

The scheduler uses it through three lines in ``scheduler/__main__.py``; nothing else of the
scheduler knows about Kubernetes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Mapping
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from redis.asyncio import Redis

from kernelfleet.config import PlatformConfig
from kernelfleet.kernelspecs.launch_kubernetes import pod_name, safe_name
from kernelfleet.kernelspecs.spec import KernelSpec
from kernelfleet.kubernetes_settings import (
    OWNER_LABEL,
    WARM_LABEL,
    KubernetesSettings,
    kubernetes_settings,
)

from . import keys, models
from .admission import Admission
from .errors import SchedulerError
from .kubernetes_nodes import LivePools, NodeWatch
from .kubernetes_pods import FailStart, PodWatch, StartFailure
from .kubernetes_warm import PlaceholderScaler, Targets, live_targets, static_targets
from .kubernetes_watch import KubeClient, KubernetesError, connect
from .leases import Lease
from .store import unavailable_as
from .warm import WarmTargets

log = logging.getLogger(__name__)

#: How long a start failure stays readable (the gateway asks within seconds).
FAILURE_KEEP_S = 3600


def placement_env(lease: Lease) -> dict[str, str]:
    """What the kernel pod template needs of the placement: cpus, memory (bytes), gpus."""
    cpus = f"{lease.cpus:g}"
    return {"KERNEL_CPUS": cpus, "KERNEL_MEMORY": str(lease.memory), "KERNEL_GPUS": str(lease.gpus)}


class UnknownStartFailure(SchedulerError):
    """No start failure is recorded for this kernel (it started, or is still starting)."""

    status = 404
    code = "unknown_start_failure"


class StartFailures:
    """Start failures in Redis (``kf:start-failure:{kernel_id}``), kept FAILURE_KEEP_S."""

    def __init__(self, redis: Redis, *, location: str, clock: Any = time.time) -> None:
        self.redis = redis
        self.location = location
        self.clock = clock

    async def record(self, failure: StartFailure) -> None:
        """Store ``failure`` (replacing an older one of the same kernel)."""
        key = keys.start_failure(failure.kernel_id)
        fields = {**failure.as_json(), "at": repr(round(self.clock(), 3))}
        with unavailable_as(self.location):
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(key, mapping=fields)
            pipe.expire(key, FAILURE_KEEP_S)
            await pipe.execute()

    async def get(self, kernel_id: str) -> dict[str, str] | None:
        """The recorded failure of ``kernel_id``, or None."""
        with unavailable_as(self.location):
            fields = await self.redis.hgetall(keys.start_failure(kernel_id))
        return dict(fields) if fields else None


class WithPlacementEnv:
    """A Scheduler whose admissions also carry :func:`placement_env`, and whose warm claims
    relabel their pods (``on_claimed``); everything else as is."""

    def __init__(self, scheduler: Any, *, on_claimed: Any = None) -> None:
        self._scheduler = scheduler
        self._on_claimed = on_claimed

    def warm_claimed(self, lease: Lease) -> None:
        """A warm kernel became ``lease.user``'s."""
        if self._on_claimed is not None:
            self._on_claimed(lease)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scheduler, name)

    @staticmethod
    def _placed(decision: Any) -> Any:
        if isinstance(decision, Admission):
            env = {**decision.env, **placement_env(decision.lease)}
            return dataclasses.replace(decision, env=env)
        return decision

    async def admit(self, **kwargs: Any) -> Any:
        """The scheduler's admit, with the placement in an admitted kernel's env."""
        return self._placed(await self._scheduler.admit(**kwargs))

    async def admission(self, *args: Any, **kwargs: Any) -> Any:
        """The scheduler's admission (of a queued request), with the placement likewise."""
        return self._placed(await self._scheduler.admission(*args, **kwargs))


def start_failures_router(failures: StartFailures) -> APIRouter:
    """``GET /v1/start-failures/{kernel_id}``: why a kernel pod did not start (admins, services)."""
    router = APIRouter(prefix="/v1")

    @router.get("/start-failures/{kernel_id}", responses={404: {"model": models.ErrorBody}})
    async def start_failure(kernel_id: models.KernelId, request: Request) -> dict[str, str]:
        """``{kernel_id, kernelspec, reason, message, at}``: reason is image_pull_failed,
        container_config, pending_timeout or start_timeout; message is for the user."""
        request.state.caller.require_admin()
        found = await failures.get(kernel_id)
        if found is None:
            raise UnknownStartFailure(f"No start failure is recorded for kernel {kernel_id}.")
        return found

    return router


class KubernetesBackend:
    """Pool capacity from nodes, fast start failures and warm placeholders (module docstring)."""

    def __init__(
        self,
        kube: KubeClient,
        platform: PlatformConfig,
        kernelspecs: Mapping[str, KernelSpec],
        *,
        settings: KubernetesSettings | None = None,
        targets: Targets | None = None,
    ) -> None:
        self.kube = kube
        self.settings = settings or kubernetes_settings(platform)
        self.nodes = NodeWatch(kube, platform, self.settings)
        self.targets = targets or static_targets(kernelspecs)
        self._live_targets = targets is None  # follow ops' targets once attached
        self.failures: StartFailures | None = None
        self.pod_watch: PodWatch | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._oneoffs: set[asyncio.Future[object]] = set()

    @classmethod
    async def start(
        cls, platform: PlatformConfig, kernelspecs: Mapping[str, KernelSpec], **kwargs: Any
    ) -> KubernetesBackend:
        """Connect and read the pools' nodes once (raises KubernetesError if that fails)."""
        backend = cls(await connect(), platform, kernelspecs, **kwargs)
        try:
            await backend.nodes.load()
        except Exception:
            await backend.kube.aclose()
            raise
        return backend

    @property
    def pools(self) -> LivePools:
        """The pools with their current capacity; give these to the Scheduler."""
        return self.nodes.pools

    def attach(self, scheduler: Any) -> WithPlacementEnv:
        """Start the watches and the scaler for ``scheduler``; serve the returned wrapper."""
        self.failures = StartFailures(scheduler.redis, location=scheduler.location)
        fail = FailStart(
            self.kube,
            record=self.failures.record,
            release=lambda kernel_id: scheduler.release(kernel_id, reason="start_failed"),
        )
        self.pod_watch = PodWatch(self.kube, self.settings, on_failure=fail)
        if self._live_targets:
            self.targets = live_targets(WarmTargets.of(scheduler))
        scaler = PlaceholderScaler(self.kube, self.settings, targets=self.targets)
        # More room (a node came up): requests queued for a full pool may be admitted now.
        self.nodes.on_change = lambda: self._spawn(scheduler.promote_all(), "promote")
        for name, loop in (("nodes", self.nodes.run()), ("pods", self.pod_watch.run()),
                           ("placeholders", scaler.run())):  # fmt: skip
            self._tasks.append(asyncio.create_task(loop, name=f"kubernetes-{name}"))
        return WithPlacementEnv(scheduler, on_claimed=self._relabel_soon)

    def _relabel_soon(self, lease: Lease) -> None:
        self._spawn(self.relabel_claimed(lease), "relabel")

    async def relabel_claimed(self, lease: Lease) -> None:
        """Label a claimed warm kernel's pod as its user's (logged, not raised, if it fails)."""
        name = pod_name(lease.kernel_id)
        try:
            found = await self.kube.label_pod(
                self.settings.namespace, name,
                labels={OWNER_LABEL: safe_name(lease.user), WARM_LABEL: "false"},
                annotations={OWNER_LABEL: lease.user},
            )  # fmt: skip
        except KubernetesError as e:
            log.warning("claimed warm kernel %s: its pod keeps its warm labels (%s)",
                        lease.kernel_id, e)  # fmt: skip
            return
        if not found:
            log.info("claimed warm kernel %s has no pod %s to relabel", lease.kernel_id, name)

    def _spawn(self, work: Awaitable[object], name: str) -> None:
        task = asyncio.ensure_future(work)
        task.set_name(f"kubernetes-{name}")
        self._oneoffs.add(task)
        task.add_done_callback(self._oneoffs.discard)

    def add_routes(self, app: FastAPI) -> None:
        """Add ``GET /v1/start-failures/{kernel_id}`` to the scheduler's app."""
        if self.failures is None:
            raise RuntimeError("attach() the scheduler before adding routes")
        app.include_router(start_failures_router(self.failures))

    async def aclose(self) -> None:
        """Stop the loops and close the connections."""
        for task in [*self._tasks, *self._oneoffs]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._oneoffs, return_exceptions=True)
        self._tasks.clear()
        await self.kube.aclose()
