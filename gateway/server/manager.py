"""Kernel managers: every kernel has an owner, an admission, a home, and a lease to release.

:class:`KernelfleetMappingKernelManager` extends EG's ``RemoteMappingKernelManager``:

- :meth:`~KernelfleetMappingKernelManager.start_kernel_for` is the one way handlers start
  kernels: it checks the kernelspec against the verified user, asks the scheduler for an
  admission (with a kernel id picked up front), pins ``KERNEL_USERNAME``, ``HOME`` and the
  admission's env, launches in the owner's home, and releases the lease if the launch fails;
- every way a kernel ends (DELETE, culling, shutdown at exit, the restarter giving up)
  releases its lease exactly once;
- a full pool makes the start wait in the scheduler's queue (bounded by the kernel launch
  timeout); its kernels' activity (state, last activity, connections) goes to the scheduler
  in batches (:mod:`gateway.server.activity`), a death at once;
- it records owners in memory (a restarted gateway forgets them; so does EG's kernel map);
- it keeps warm kernels (:mod:`gateway.server.warm`): a start claims a ready one of its
  kernelspec when there is one, else starts cold.

:class:`KernelfleetKernelManager` (one per kernel) applies the pinned env last, after the
kernelspec's ``env`` and the client's ``KERNEL_*`` values, on every launch and restart.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from enterprise_gateway.services.kernels.remotemanager import (
    RemoteKernelManager,
    RemoteMappingKernelManager,
)
from jupyter_client.kernelspec import NoSuchKernel
from jupyter_server._tz import utcnow
from tornado import web
from traitlets import Bool, Float

from .activity import ActivityReporter, KernelActivity
from .activity_watch import LightActivityWatchMixin
from .compliance import Compliance, audited_start
from .errors import GatewayError
from .identity import Identity
from .policy import USERNAME_VAR, check_may_start, home_for, scheduler_kernelspec_name
from .ports import DistinctPortsMixin
from .scheduler import NoScheduler, Scheduler
from .warm import WARM_VAR, WarmPool
from .welcome import probe_soon
from .zmqstreams import ChannelStreamsMixin

DEFAULT_LAUNCH_TIMEOUT_S = 30.0  # EG's own default (EG_KERNEL_LAUNCH_TIMEOUT)
KERNELSPEC_CACHE_S = 1.0  # how long a kernelspec read from disk is reused


class KernelfleetKernelManager(ChannelStreamsMixin, DistinctPortsMixin, RemoteKernelManager):
    """EG's per-kernel manager, plus ``pinned_env`` applied last on every (re)launch."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pinned_env: dict[str, str] = {}
        self.secret_env: dict[str, str] = {}  # this kernel's secrets; pinned_env wins

    def _capture_user_overrides(self, **kwargs: Any) -> None:
        # EG applies user_overrides after the kernelspec env, right before launching.
        super()._capture_user_overrides(**kwargs)
        self.user_overrides.update(self.secret_env)
        self.user_overrides.update(self.pinned_env)


class KernelfleetMappingKernelManager(LightActivityWatchMixin, RemoteMappingKernelManager):
    """EG's kernel map with owners, admissions and lease releases (see module docstring).

    The app calls :meth:`attach` once before serving. Handlers call
    :meth:`start_kernel_for`, :meth:`may_access` and :meth:`owner_of`.
    """

    activity_interval = Float(
        1.0,
        help="""Seconds between batches of kernel activity (execution state, last activity,
        connections) sent to the scheduler; deaths go at once. 0 sends none.""",
    ).tag(config=True)

    queue_admissions = Bool(
        True,
        help="""When a pool is full, wait in the scheduler's queue for room (up to the kernel
        launch timeout: the client's KERNEL_LAUNCH_TIMEOUT, else EG's) instead of refusing.""",
    ).tag(config=True)

    warm_interval = Float(
        2.0,
        help="""Seconds between warm-pool refills (targets come from the scheduler; a claim
        refills at once). 0 keeps no warm kernels.""",
    ).tag(config=True)

    warm_claim_timeout = Float(
        10.0,
        help="""Seconds a claimed warm kernel may take to take on its user's env and home;
        past that it is stopped and the start goes on cold.""",
    ).tag(config=True)

    warm_refill_delay = Float(
        1.0,
        help="""Seconds after a claim before the warm pool starts its replacement (a kernel
        start takes a core for about half a second, which the claimed kernel's first
        messages need more).""",
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._spec_cache: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self.warm = WarmPool(self, interval_s=self.warm_interval,
                             claim_timeout_s=self.warm_claim_timeout,
                             refill_delay_s=self.warm_refill_delay)  # fmt: skip
        self.scheduler: Scheduler = NoScheduler()
        self.kernel_home_root = os.path.abspath(".kernelfleet/home")
        self._owners: dict[str, str] = {}
        self._releases: dict[str, asyncio.Future[None]] = {}
        self.compliance = Compliance()  # the app sets the configured one (audit, secrets)
        self.activity: ActivityReporter | None = None

    def _kernel_manager_class_default(self) -> str:
        return f"{KernelfleetKernelManager.__module__}.{KernelfleetKernelManager.__qualname__}"

    def attach(self, *, scheduler: Scheduler, kernel_home_root: str) -> None:
        """Give the manager its scheduler and the root of users' homes."""
        self.scheduler = scheduler
        self.kernel_home_root = kernel_home_root

    # -- ownership ---------------------------------------------------------------------------

    def owner_of(self, kernel_id: str) -> str | None:
        """The user who started ``kernel_id``, if the gateway knows it."""
        return self._owners.get(kernel_id)

    def may_access(self, kernel_id: str, identity: Identity) -> bool:
        """Whether ``identity`` may see and use ``kernel_id`` (its owner, or an admin)."""
        if kernel_id not in self or self.warm.is_warm(kernel_id):
            return False  # warm kernels are nobody's until claimed
        return identity.admin or self._owners.get(kernel_id) == identity.name

    def kernel_model(self, kernel_id: str) -> dict[str, Any]:
        """The kernel's JSON model, also while it is still starting.

        jupyter_server 1.24 puts a kernel in the list before it sets ``last_activity`` and
        ``execution_state`` (it awaits the kernel's readiness in between), so listing during
        that window raised AttributeError: a 500 on the ``/api/kernels`` JupyterLab polls.
        """
        kernel = self._kernels.get(kernel_id)
        if kernel is not None and not hasattr(kernel, "last_activity"):
            kernel.last_activity = utcnow()
            kernel.execution_state = "starting"
        return dict(super().kernel_model(kernel_id))

    # -- start -------------------------------------------------------------------------------

    @audited_start
    async def start_kernel_for(
        self,
        identity: Identity,
        *,
        kernel_name: str,
        env: dict[str, str],
        kernel_headers: dict[str, str] | None = None,
        client_gone: Callable[[], bool] | None = None,
    ) -> str:
        """Start ``kernel_name`` for ``identity`` with the (already sanitised) client ``env``.

        Returns the kernel id. Raises GatewayError 404 (unknown or non-curated kernelspec),
        403 (not for this user's groups, or quota) or the scheduler's refusal status. While
        the admission waits for room, ``client_gone()`` true withdraws it.
        """
        spec = self._kernelspec_dict(kernel_name)
        check_may_start(identity, kernel_name, spec)
        home = home_for(self.kernel_home_root, identity.name)
        claimed = await self.warm.claim(identity, kernel_name=kernel_name, spec=spec, env=env,
                                        home=home)  # fmt: skip
        if claimed is not None:
            self._start_activity()
            return claimed
        kernel_id = str(uuid.uuid4())
        admitted_env = await self.scheduler.admit(
            kernel_id=kernel_id,
            user=identity.name,
            groups=sorted(identity.groups),
            kernelspec=scheduler_kernelspec_name(kernel_name, spec or {}),
            admin=identity.admin,
            wait_s=self._queue_wait_s(env),
            client_gone=client_gone,
        )
        self._start_activity()
        pinned = {**admitted_env, USERNAME_VAR: identity.name, "HOME": home}
        self._owners[kernel_id] = identity.name
        try:
            os.makedirs(home, mode=0o700, exist_ok=True)
            await self.compliance.prepare_secrets(kernel_id, identity, kernel_name, spec)
            # EG's way to pick the id up front is KERNEL_ID in the env (a kernel_id argument
            # collides with its session bookkeeping).
            await self.start_kernel(
                kernel_name=kernel_name,
                env={**env, **pinned, "KERNEL_ID": kernel_id},
                pinned_env=pinned,
                cwd=home,
                kernel_headers=kernel_headers or {},
            )
        except (web.HTTPError, asyncio.CancelledError):
            await self._abandon(kernel_id)
            raise
        except Exception as e:
            self.log.exception("Kernel %s (%s) failed to start", kernel_id, kernel_name)
            # On Kubernetes the scheduler says why a pod did not start (it deleted the pod,
            # which is what made the launch fail): asked before the lease is given up.
            failure = await self.scheduler.start_failure(kernel_id)
            await self._abandon(kernel_id)
            if failure is not None:
                raise GatewayError(500, failure.message, code=failure.reason) from e
            raise GatewayError(
                500, f"Kernel '{kernel_name}' failed to start.", code="launch_failed"
            ) from e
        self.log.info("Kernel %s (%s) started for %s", kernel_id, kernel_name, identity.name)
        probe_soon(self.get_kernel(kernel_id), kernel_id)
        return kernel_id

    def _queue_wait_s(self, env: dict[str, str]) -> float:
        """How long an admission may wait for room: the launch timeout, client's or EG's."""
        if not self.queue_admissions:
            return 0.0
        for value in (env.get("KERNEL_LAUNCH_TIMEOUT"), os.environ.get("EG_KERNEL_LAUNCH_TIMEOUT")):
            try:
                if value:
                    return max(0.0, float(value))
            except ValueError:
                pass  # not a number: the next source, or the default
        return DEFAULT_LAUNCH_TIMEOUT_S

    async def _abandon(self, kernel_id: str) -> None:
        """After a failed start: stop whatever was launched and release the lease."""
        if kernel_id in self:
            try:
                await super().shutdown_kernel(kernel_id, now=True)
            except Exception:
                self.log.warning("Could not stop half-started kernel %s", kernel_id, exc_info=True)
        await self._forget(kernel_id)

    # -- warm kernels (gateway.server.warm) ---------------------------------------------------

    def inherited_env(self) -> dict[str, str]:
        """The gateway's own variables a kernel inherits (EG's ``inherited_envs``)."""
        names = getattr(self.parent, "inherited_envs", None) or []
        return {name: os.environ[name] for name in names if name in os.environ}

    def adopt(self, kernel_id: str, user: str) -> None:
        """A claimed warm kernel now belongs to ``user``."""
        self._owners[kernel_id] = user

    def personalised(
        self, kernel_id: str, *, env: dict[str, str], pinned: dict[str, str],
        secret_env: dict[str, str], cwd: str,
    ) -> None:  # fmt: skip
        """A claimed kernel is its user's: a restart relaunches it with their env and home."""
        km = self._kernels[kernel_id]
        km.pinned_env = dict(pinned)
        km.secret_env = dict(secret_env)
        km.user_overrides.pop(WARM_VAR, None)
        launch_args = getattr(km, "_launch_args", None)
        if isinstance(launch_args, dict):
            launch_args["cwd"] = cwd
            launch_env = launch_args.get("env")
            if isinstance(launch_env, dict):
                launch_env.update({**env, **pinned})
                launch_env.pop(WARM_VAR, None)

    async def discard_warm(self, kernel_id: str) -> None:
        """Stop a warm (or failed-claim) kernel and release its lease; no audit record."""
        if kernel_id in self:
            try:
                await super().shutdown_kernel(kernel_id, now=True)
            except Exception:
                self.log.warning("Could not stop warm kernel %s", kernel_id, exc_info=True)
        await self.scheduler.release(kernel_id)

    async def abandon_claim(self, kernel_id: str) -> None:
        """A claim failed before its kernel was handed over: stop it, forget its secrets."""
        self._owners.pop(kernel_id, None)
        self.compliance.values.discard(kernel_id)
        self.compliance.take_secret_env(kernel_id)
        await self.discard_warm(kernel_id)

    def _kernelspec_dict(self, kernel_name: str) -> dict[str, Any] | None:
        """The kernelspec as a dict (None if there is none), read at most once a second.

        A start looks it up several times (policy, audit, secrets), and each lookup lists
        every kernelspec folder and parses kernel.json: a few ms on a warm claim's path.
        Callers must not change the dict.
        """
        now = time.monotonic()
        cached = self._spec_cache.get(kernel_name)
        if cached is not None and now - cached[0] < KERNELSPEC_CACHE_S:
            return cached[1]
        try:
            spec: dict[str, Any] | None = self.kernel_spec_manager.get_kernel_spec(
                kernel_name
            ).to_dict()
        except NoSuchKernel:
            spec = None
        self._spec_cache[kernel_name] = (now, spec)
        return spec

    def pre_start_kernel(self, kernel_name: str, kwargs: dict[str, Any]) -> tuple[Any, str, str]:
        """Create the per-kernel manager and hand it the pinned env (not a Popen argument)."""
        pinned = kwargs.pop("pinned_env", {})
        km, kernel_name, kernel_id = super().pre_start_kernel(kernel_name, kwargs)
        km.pinned_env = dict(pinned)
        km.secret_env = self.compliance.take_secret_env(kernel_id)
        return km, kernel_name, kernel_id

    # -- end ---------------------------------------------------------------------------------

    async def shutdown_kernel(
        self, kernel_id: str, now: bool = False, restart: bool = False
    ) -> None:
        """Shut the kernel down, then release its lease (also when shutting down failed)."""
        try:
            await super().shutdown_kernel(kernel_id, now=now, restart=restart)
        finally:
            if not restart:
                await self._forget(kernel_id)

    def _handle_kernel_died(self, kernel_id: str) -> None:
        """EG's restarter gave up on the kernel: drop it and release its lease."""
        super()._handle_kernel_died(kernel_id)
        self.compliance.note_died(kernel_id)
        if self.activity is not None:
            self.activity.kernel_died(kernel_id)
        self._forget_soon(kernel_id)

    def _forget_soon(self, kernel_id: str) -> None:
        known = kernel_id in self._owners or self.warm.is_warm(kernel_id)
        if known and kernel_id not in self._releases:
            task = asyncio.ensure_future(self._forget(kernel_id))
            self._releases[kernel_id] = task
            task.add_done_callback(lambda _: self._releases.pop(kernel_id, None))

    async def _forget(self, kernel_id: str) -> None:
        """Drop the owner and release the lease, once per kernel."""
        if self._owners.pop(kernel_id, None) is not None:
            await self.scheduler.release(kernel_id)
            await self.compliance.ended(kernel_id)
        elif await self.warm.forget(kernel_id):
            await self.scheduler.release(kernel_id)

    async def wait_for_releases(self) -> None:
        """Wait for lease releases still in flight (at exit), then send the last activity."""
        pending = list(self._releases.values())
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self.activity is not None:
            await self.activity.stop()

    # -- activity ----------------------------------------------------------------------------

    def _start_activity(self) -> None:
        """Start reporting kernel activity to the scheduler (once, in the running loop)."""
        if self.activity is None and self.activity_interval > 0:
            self.activity = ActivityReporter(
                self._activity_snapshot, self.scheduler.report_activity,
                interval_s=self.activity_interval,
            )  # fmt: skip
        if self.activity is not None:
            self.activity.start()

    def _activity_snapshot(self) -> dict[str, KernelActivity]:
        """State, last activity (unix s) and connections of the kernels started here."""
        snapshot = {}
        for kernel_id in list(self._owners) + self.warm.kernel_ids():
            km = self._kernels.get(kernel_id)
            if km is None:
                continue  # still launching
            last = getattr(km, "last_activity", None)
            snapshot[kernel_id] = KernelActivity(
                execution_state=str(getattr(km, "execution_state", "starting")),
                last_activity=last.timestamp() if last is not None else None,
                connections=int(self._kernel_connections.get(kernel_id, 0)),
            )
        return snapshot
