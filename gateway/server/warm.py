"""Warm pools in the gateway: pre-started kernels, each handed to one user, once.

Enterprise Gateway has no kernel pool, so the gateway keeps one (docs/scheduler.md, "Warm
pools"). :class:`WarmPool` runs a refill loop: every ``interval_s`` (and at once after a
claim) it reads each kernelspec's target from the scheduler (``GET /v1/warm-pools``; without
a scheduler, the kernelspec's own ``warm_target``), starts the missing kernels one at a time
(each admitted as a warm lease: pool capacity, no user) and stops the surplus. A warm kernel
starts in ``<kernel_home_root>/.warm`` with ``KERNEL_WARM=true`` and ``KERNEL_USERNAME`` set
to :data:`WARM_USERNAME`; once it answers, a shell
connection to it is kept open for the claim.

A user's start claims the oldest ready kernel of its kernelspec (:meth:`WarmPool.claim`).
Two things happen at once, and the kernel is handed over when both have succeeded:

- the scheduler moves the lease to the user, checking their quota as a cold start would;
- the user's secrets are resolved (the same hook as a cold start) and the kernel is
  personalised with one silent execute request that sets the env a cold start gets
  (``KERNEL_USERNAME``, ``HOME``, the client's ``KERNEL_*`` values, the GPUs of its lease,
  secrets), drops ``KERNEL_WARM`` and changes to the user's home; its reply must show the
  user's name and home back. The code is not kept in the kernel's history.

A failed personalisation stops the kernel and the start goes on cold: nobody ever gets a
half-personalised kernel. A refused claim refuses the start; the kernel, possibly
personalised already, is stopped (the pool refills). So that a user at their quota cannot
drain the pool by retrying, their next claims for :data:`REFUSED_MEMORY_S` ask the
scheduler first and personalise only once it agreed (a refusal then keeps the kernel warm).

The kernel's own manager then holds the user's env and home, so a restart relaunches it as
the user's. Warm kernels have no owner: no user (admins included) sees or opens them through
the API; ``GET /api/kernels?include=warm`` lists them for admins (the scheduler reconciles).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from tornado import web

from .errors import GatewayError
from .identity import Identity
from .policy import USERNAME_VAR, curated_metadata, scheduler_kernelspec_name
from .welcome import probe, shared_context

if TYPE_CHECKING:
    from .manager import KernelfleetMappingKernelManager

log = logging.getLogger("kernelfleet.gateway")

WARM_VAR = "KERNEL_WARM"
#: KERNEL_USERNAME of a warm kernel until its claim (EG refuses to launch for root).
WARM_USERNAME = "kernelfleet-warm"
READY_TIMEOUT_S = 60.0  # a warm kernel that has not answered by then is stopped
#: Scheduler answers that mean "this warm kernel is gone or not warm": try the next one.
_STALE_CODES = frozenset({"warm_taken", "unknown_lease"})
#: Seconds after a refused claim during which that user's claims ask the scheduler first.
REFUSED_MEMORY_S = 60.0
_NEXT = object()  # a claim found its kernel gone: try the next one


@dataclass
class WarmKernel:
    """A started, answering, unowned kernel and the shell connection kept for its claim."""

    kernel_id: str
    kernel_name: str
    client: Any  # jupyter_client AsyncKernelClient with its shell channel open
    ready_at: float
    env: dict[str, str]  # what its lease gives a kernel (GPU devices): a claim must agree


def personalise_code(env: dict[str, str], home: str) -> str:
    """The Python a claim runs in the kernel: the user's env and working directory.

    Values are Python literals (``repr``), so no value can change the code around it.
    """
    return (
        "import os as __kf_os\n"
        f"__kf_os.environ.update({env!r})\n"
        f"__kf_os.environ.pop({WARM_VAR!r}, None)\n"
        f"__kf_os.chdir({home!r})\n"
        "del __kf_os\n"
    )


#: Evaluated after the personalisation: what the kernel now says about itself.
CHECKS = {
    "user": f"__import__('os').environ.get({USERNAME_VAR!r})",
    "home": "__import__('os').environ.get('HOME')",
    "cwd": "__import__('os').getcwd()",
    "warm": f"__import__('os').environ.get({WARM_VAR!r})",
}


def personalised(reply: dict[str, Any], *, user: str, home: str) -> str | None:
    """None if ``reply`` (an execute_reply) shows the kernel is ``user``'s, else why not."""
    content = reply.get("content") or {}
    if content.get("status") != "ok":
        return f"the setup code failed: {content.get('ename', '')} {content.get('evalue', '')}"
    expected = {"user": repr(user), "home": repr(home), "cwd": repr(home), "warm": "None"}
    found = content.get("user_expressions") or {}
    for name, value in expected.items():
        got = (found.get(name) or {}).get("data", {}).get("text/plain")
        if got != value:
            return f"{name} is {got} after the setup, not {value}"
    return None


class WarmPool:
    """Keeps warm kernels at their targets and hands them out (see module docstring)."""

    def __init__(
        self, manager: KernelfleetMappingKernelManager, *, interval_s: float,
        claim_timeout_s: float = 10.0, refill_delay_s: float = 1.0,
    ) -> None:  # fmt: skip
        self._manager = manager
        self.interval_s = interval_s
        self.refill_delay_s = refill_delay_s
        self.claim_timeout_s = claim_timeout_s
        self.ready: dict[str, list[WarmKernel]] = {}  # kernel name -> oldest first
        self.starting: dict[str, str] = {}  # kernel id -> kernel name
        self.claiming: dict[str, str] = {}  # kernel id -> kernel name, out for a claim
        self.claimed: set[str] = set()  # kernels handed to a user (their start is a claim)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._problems: dict[str, str] = {}  # kernel name -> last refill problem logged
        self._refused: dict[str, float] = {}  # user -> monotonic time of a refused claim

    # -- what is warm ------------------------------------------------------------------------

    def is_warm(self, kernel_id: str) -> bool:
        """Whether ``kernel_id`` is a warm kernel: ready, still starting, or out for a claim
        that has not handed it to its user yet (nobody's until then)."""
        if kernel_id in self.starting or self._unclaimed(kernel_id):
            return True
        return any(w.kernel_id == kernel_id for ready in self.ready.values() for w in ready)

    def _unclaimed(self, kernel_id: str) -> bool:
        """Out for a claim, not yet adopted by the claiming user."""
        return kernel_id in self.claiming and self._manager.owner_of(kernel_id) is None

    def kernel_ids(self) -> list[str]:
        """Every warm kernel: ready, starting, or out for a claim (the activity reports list
        these with the users' kernels: one missing from a report is reported dead, and the
        scheduler would release the lease the claim just gave its user)."""
        ready = [w.kernel_id for kernels in self.ready.values() for w in kernels]
        return ready + list(self.starting) + list(self.claiming)

    def counts(self) -> dict[str, int]:
        """Ready warm kernels per kernelspec."""
        return {name: len(kernels) for name, kernels in self.ready.items() if kernels}

    # -- the loop ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the refill loop in the running event loop (once; not with interval 0)."""
        if self._task is None and self.interval_s > 0:
            self._task = asyncio.ensure_future(self._run())

    def wake(self, after_s: float = 0.0) -> None:
        """Refill in ``after_s`` seconds rather than at the next interval."""
        if after_s > 0:
            asyncio.get_running_loop().call_later(after_s, self._wake.set)
        else:
            self._wake.set()

    async def stop(self) -> None:
        """Stop refilling and close the kept connections (EG stops the kernels at exit)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for kernels in self.ready.values():
            for warm in kernels:
                _close(warm)

    async def _run(self) -> None:
        while True:
            try:
                await self.refill()
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop outlives any one round
                log.exception("Warm pool refill failed; trying again in %.0f s", self.interval_s)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except asyncio.TimeoutError:
                pass

    async def targets(self) -> dict[str, int]:
        """Warm target per EG kernel name (curated kernelspecs only)."""
        try:
            from_scheduler = await self._manager.scheduler.warm_targets()
        except GatewayError as e:
            self._problem("", f"no targets from the scheduler ({e.detail}); keeping what is warm")
            return {name: len(kernels) for name, kernels in self.ready.items()}
        self._problems.pop("", None)
        targets = {}
        specs = self._manager.kernel_spec_manager.get_all_specs()
        for name, entry in sorted(specs.items()):
            spec = entry.get("spec") or {}
            curated = curated_metadata(spec)
            if curated is None:
                continue
            if from_scheduler is None:
                target = curated.get("warm_target") or 0
            else:
                target = from_scheduler.get(scheduler_kernelspec_name(name, spec), 0)
            targets[name] = max(0, int(target))
        return targets

    async def refill(self) -> None:
        """One round: stop the surplus, then start missing kernels one at a time."""
        targets = await self.targets()
        for name, kernels in self.ready.items():
            while len(kernels) > targets.get(name, 0):
                warm = kernels.pop()  # the newest goes first
                log.info("Warm pool %s: target %s, stopping warm kernel %s",
                         name, targets.get(name, 0), warm.kernel_id)  # fmt: skip
                await self._discard(warm)
        for name, target in targets.items():
            while self._have(name) < target:
                if not await self._start_one(name):
                    break  # no room now (or it failed): next round

    def _have(self, name: str) -> int:
        # A kernel out for a claim may come back (refused): not replaced before it is known.
        pending = [*self.starting.values(), *self.claiming.values()]
        return len(self.ready.get(name, [])) + sum(1 for n in pending if n == name)

    async def _start_one(self, kernel_name: str) -> bool:
        """Start one warm kernel of ``kernel_name``; whether it is ready now."""
        manager = self._manager
        spec = manager._kernelspec_dict(kernel_name) or {}
        kernel_id = str(uuid.uuid4())
        self.starting[kernel_id] = kernel_name
        try:
            try:
                env = await manager.scheduler.admit_warm(
                    kernel_id=kernel_id, kernelspec=scheduler_kernelspec_name(kernel_name, spec)
                )
            except GatewayError as e:
                self._problem(kernel_name, f"not starting a warm kernel: {e.message}")
                return False
            home = os.path.join(manager.kernel_home_root, ".warm")
            pinned = {**env, WARM_VAR: "true", "HOME": home, USERNAME_VAR: WARM_USERNAME}
            began = time.perf_counter()
            try:
                os.makedirs(home, mode=0o700, exist_ok=True)
                await manager.start_kernel(
                    kernel_name=kernel_name, env={**pinned, "KERNEL_ID": kernel_id},
                    pinned_env=pinned, cwd=home, kernel_headers={},
                )  # fmt: skip
                client = await self._connect(kernel_id)
            except Exception as e:
                log.debug("Warm kernel %s did not start", kernel_id, exc_info=True)
                self._problem(kernel_name, f"a warm kernel did not start: {_describe(e)}")
                await manager.discard_warm(kernel_id)
                return False
        finally:
            self.starting.pop(kernel_id, None)
        self._problems.pop(kernel_name, None)
        manager._start_activity()  # the scheduler learns the kernel is up (lease state)
        self.ready.setdefault(kernel_name, []).append(
            WarmKernel(kernel_id, kernel_name, client, time.time(), env)
        )
        log.info("Warm pool %s: kernel %s ready in %.2f s (%d ready)", kernel_name, kernel_id,
                 time.perf_counter() - began, len(self.ready[kernel_name]))  # fmt: skip
        return True

    async def _connect(self, kernel_id: str) -> Any:
        """A shell connection to the kernel once it answers, after one warm-up execution."""
        km = self._manager.get_kernel(kernel_id)
        # One ZMQ context for them all: jupyter_client 6 would make one, with its own I/O
        # thread, for each client and never end it.
        client = km.client(context=shared_context())
        client.start_channels(shell=True, iopub=False, stdin=False, hb=False, control=False)
        try:
            info = await client.kernel_info(reply=True, timeout=READY_TIMEOUT_S)
            # The first execution of a fresh IPython is the slow one: not on the claim's path.
            await client.execute("pass", silent=True, store_history=False, reply=True,
                                 user_expressions=CHECKS, timeout=READY_TIMEOUT_S)  # fmt: skip
            # Whether its channels connections can skip the kernel_info nudge (.welcome).
            await probe(km)
        except BaseException:
            _close_shell(client)
            raise
        # It answered and finished: idle. (EG's IOPub watch may have subscribed too late to
        # see these first status messages, and nothing else runs on a warm kernel.)
        km.execution_state = "idle"
        # jupyter_server asks a kernel for its protocol version once, on the first channels
        # connection, and keeps the answer here; this one already answered.
        known: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        known.set_result(dict(info.get("content") or {}))
        km._kernel_info_future = known
        return client

    def _problem(self, kernel_name: str, text: str) -> None:
        """Log a refill problem once until it changes (a full pool is retried every round)."""
        if self._problems.get(kernel_name) != text:
            self._problems[kernel_name] = text
            log.warning("Warm pool %s: %s", kernel_name or "(all)", text)

    async def _abandon(self, warm: WarmKernel) -> None:
        """Stop a kernel taken out of the pool for a claim that did not complete."""
        _close(warm)
        try:
            await self._manager.abandon_claim(warm.kernel_id)
        except Exception:
            log.warning("Could not stop abandoned warm kernel %s", warm.kernel_id, exc_info=True)

    async def _discard(self, warm: WarmKernel) -> None:
        _close(warm)
        await self._manager.discard_warm(warm.kernel_id)

    # -- claims ------------------------------------------------------------------------------

    async def claim(
        self,
        identity: Identity,
        *,
        kernel_name: str,
        spec: dict[str, Any] | None,
        env: dict[str, str],
        home: str,
    ) -> str | None:
        """Hand a ready kernel of ``kernel_name`` to ``identity``; its id, or None (start
        cold). Raises the scheduler's refusal (quota) as a cold start would."""
        kernels = self.ready.get(kernel_name)
        while kernels:
            warm = kernels.pop(0)
            self.claiming[warm.kernel_id] = kernel_name
            try:
                claimed = await self._claim(warm, identity, kernel_name, spec, env, home)
            finally:
                self.claiming.pop(warm.kernel_id, None)
            if claimed is not _NEXT:
                return cast("str | None", claimed)
        return None

    async def _claim(
        self, warm: WarmKernel, identity: Identity, kernel_name: str,
        spec: dict[str, Any] | None, env: dict[str, str], home: str,
    ) -> str | None | object:  # fmt: skip
        """One claim of ``warm``: its id, None (start cold) or :data:`_NEXT` (it was gone:
        try the next one); raises the scheduler's refusal."""
        manager = self._manager
        # Not at once: starting a kernel takes a core for ~0.5 s, which the user's first
        # messages to the claimed kernel need more.
        self.wake(after_s=self.refill_delay_s)
        claiming = manager.scheduler.claim_warm(
            kernel_id=warm.kernel_id, user=identity.name, groups=sorted(identity.groups),
            kernelspec=scheduler_kernelspec_name(kernel_name, spec or {}),
            admin=identity.admin,
        )  # fmt: skip
        setup = None
        if not self._refused_lately(identity.name):
            setup = asyncio.ensure_future(
                self._personalise(warm, identity, kernel_name, spec, env, home)
            )
        try:
            admitted = await claiming
        except GatewayError as e:
            stale = e.code in _STALE_CODES
            if setup is not None:  # perhaps personalised already, for nobody: stop it
                await asyncio.gather(setup, return_exceptions=True)
                await self._abandon(warm)
            elif stale:
                await self._discard(warm)
            if stale:
                log.info("Warm kernel %s is gone (%s); trying the next", warm.kernel_id, e.code)
                return _NEXT
            if setup is None:  # refused for this user: still warm for others
                self.ready.setdefault(kernel_name, []).insert(0, warm)
            else:
                self._refused[identity.name] = time.monotonic()
            raise
        except BaseException:  # the start was cancelled (client gone), or a bug
            if setup is not None:
                setup.cancel()
            # Nobody's now; stopped in the background: this task may be cancelled.
            asyncio.ensure_future(self._abandon(warm))
            raise
        manager.adopt(warm.kernel_id, identity.name)
        try:
            await (setup or self._personalise(warm, identity, kernel_name, spec, env, home))
            if admitted != warm.env:
                raise RuntimeError(f"its lease now gives {admitted}, not {warm.env}")
        except Exception as e:
            log.warning("Warm kernel %s could not be personalised for %s (%s); stopping "
                        "it, starting cold", warm.kernel_id, identity.name, e)  # fmt: skip
            await self._abandon(warm)
            return None
        # closing sockets is not the user's wait: after the answer is on its way
        asyncio.get_running_loop().call_soon(_close, warm)
        self.claimed.add(warm.kernel_id)
        log.info("Kernel %s (%s) claimed warm by %s", warm.kernel_id, kernel_name,
                 identity.name)  # fmt: skip
        return warm.kernel_id

    def _refused_lately(self, user: str) -> bool:
        """Whether a claim of ``user``'s was refused in the last :data:`REFUSED_MEMORY_S`."""
        now = time.monotonic()
        for name, when in list(self._refused.items()):
            if now - when > REFUSED_MEMORY_S:
                del self._refused[name]
        return user in self._refused

    async def _personalise(
        self, warm: WarmKernel, identity: Identity, kernel_name: str,
        spec: dict[str, Any] | None, env: dict[str, str], home: str,
    ) -> None:  # fmt: skip
        manager = self._manager
        os.makedirs(home, mode=0o700, exist_ok=True)
        await manager.compliance.prepare_secrets(warm.kernel_id, identity, kernel_name, spec)
        secret_env = manager.compliance.take_secret_env(warm.kernel_id)
        pinned = {**warm.env, USERNAME_VAR: identity.name, "HOME": home}
        user_env = {k: v for k, v in env.items() if k not in ("KERNEL_ID", WARM_VAR)}
        reply = await warm.client.execute(
            personalise_code({**user_env, **secret_env, **pinned}, home), silent=True,
            store_history=False, user_expressions=CHECKS, reply=True,
            timeout=self.claim_timeout_s,
        )  # fmt: skip
        problem = personalised(reply, user=identity.name, home=home)
        if problem is not None:
            raise RuntimeError(problem)
        manager.personalised(warm.kernel_id, env=user_env, pinned=pinned,
                             secret_env=secret_env, cwd=home)  # fmt: skip

    async def forget(self, kernel_id: str) -> bool:
        """Drop ``kernel_id`` if it is warm (it died or was stopped); whether it was. One out
        for a claim counts (its claim then fails or finds the lease gone)."""
        if self._unclaimed(kernel_id):
            del self.claiming[kernel_id]
            return True
        for kernels in self.ready.values():
            for warm in kernels:
                if warm.kernel_id == kernel_id:
                    kernels.remove(warm)
                    _close(warm)
                    self.wake()
                    return True
        return self.starting.pop(kernel_id, None) is not None


def _describe(error: BaseException) -> str:
    if isinstance(error, GatewayError):
        return error.detail
    if isinstance(error, web.HTTPError):
        return f"HTTP {error.status_code}: {error.log_message or error.reason or ''}"
    return f"{type(error).__name__}: {error}"


def _close(warm: WarmKernel) -> None:
    _close_shell(warm.client)


def _close_shell(client: Any) -> None:
    """Close the one socket a warm client opened.

    Not ``stop_channels()``: jupyter_client 6 creates every channel it asks about, so that
    would connect four more sockets and start a heartbeat event loop just to close them.
    """
    channel = getattr(client, "_shell_channel", None)
    if channel is not None:
        try:
            channel.close()
        except Exception:  # a socket of a dead kernel
            log.debug("closing a warm kernel's shell socket", exc_info=True)
