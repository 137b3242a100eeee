"""Admission: may this user start this kernel now? One atomic Redis round trip decides.

The ``ADMIT`` script (:mod:`scheduler.lua`) checks the user's effective quota (kernels -
counting their waiting requests -, cpus, memory, gpus and GPU-hours in the last 24 hours)
and the pool's capacity (cpus, memory, and GPUs counted as devices in a free-device set),
picks the lowest free GPU devices, creates the lease and updates the user's and the pool's
counters - or refuses and says which limit was hit - or, when the pool is full (or others
already wait for it) and the caller is willing to wait, puts the request in the pool's fair
queue (:mod:`scheduler.queue`). Python turns a refusal into a message the user can act on
(:mod:`scheduler.messages`). Admitting the same kernel id again returns the same lease, or
the same place in the queue.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from kernelfleet.config import Quota, Quotas
from kernelfleet.kernelspecs.spec import KernelSpec

from . import keys, lua, messages
from .batching import Packed, batcher_for
from .errors import (
    KernelspecForbidden,
    LeaseConflict,
    PoolFull,
    QuotaExceeded,
    SchedulerError,
    UnknownKernelspec,
)
from .leases import GPU_WINDOW_S, Lease
from .pools import Pool, from_milli, to_milli
from .quotas import effective_quota
from .store import unavailable_as

log = logging.getLogger(__name__)

UNLIMITED = -1


@dataclass(frozen=True)
class Admission:
    """An admitted kernel: its lease, the env it must get, and whether it was new."""

    lease: Lease
    env: dict[str, str]
    created: bool


@dataclass(frozen=True)
class Queued:
    """A request waiting in ``pool``'s queue at ``position`` (1 = next) until ``deadline``."""

    kernel_id: str
    pool: str
    position: int
    deadline: float


def kernel_env(lease: Lease) -> dict[str, str]:
    """The env a kernel must get: its GPU devices, or none visible ("") without GPUs."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in lease.gpu_devices)}


def _limit(value: float | None, *, scale: Callable[[float], int] = int) -> int:
    return UNLIMITED if value is None else scale(value)


def quota_limits(quota: Quota) -> dict[str, int]:
    """The quota as the scripts take it: integers, cpus in milli, GPU-hours in seconds."""
    return {
        "kernels": _limit(quota.kernels),
        "cpus_milli": _limit(quota.cpus, scale=to_milli),
        "memory": _limit(quota.memory),
        "gpus": _limit(quota.gpus),
        "gpu_seconds": _limit(quota.gpu_hours_per_day, scale=lambda h: round(h * 3600)),
    }


def pool_capacity(pool: Pool) -> dict[str, int]:
    """The pool's capacity as the scripts take it."""
    return {"cpus_milli": pool.cpus_milli, "memory": pool.memory, "gpus": pool.gpus}


def admission_args(
    *,
    user: str,
    groups: Sequence[str],
    admin: bool,
    spec: KernelSpec,
    pool: Pool,
    quota: Quota,
    warm: bool = False,
) -> tuple[str | int, ...]:
    """``ARGV[4..]`` of the ADMIT script (:data:`scheduler.lua.REQUEST_FIELDS`, in order):
    what does not change from one request of this user for this kernelspec to the next (the
    kernel id, ``now`` and ``deadline`` travel as ``ARGV[1..3]``)."""
    res = spec.resources
    values: dict[str, str | int] = {
        "user": user, "kernelspec": spec.name, "pool": pool.name, "cpus": repr(float(res.cpus)),
        "cpus_milli": to_milli(res.cpus), "memory": res.memory, "gpus": res.gpus,
        "groups": json.dumps(sorted(set(groups))), "admin": int(admin), "warm": int(warm),
        "window": GPU_WINDOW_S,
    }  # fmt: skip
    values.update({f"quota_{k}": v for k, v in quota_limits(quota).items()})
    values.update({f"capacity_{k}": v for k, v in pool_capacity(pool).items()})
    return tuple(values[name] for name, _ in lua.REQUEST_FIELDS)


@dataclass(frozen=True)
class _Prepared:
    """The parts of an admission that depend only on who asks for what, and what they
    were computed from (a change of any of those objects computes them again)."""

    spec: KernelSpec
    pool: Pool
    quotas: Quotas
    args: Packed


#: Prepared admissions kept (user x groups x kernelspec): dropped all at once when full.
_PREPARED_KEPT = 20_000


class Admitter:
    """Decides admissions against the loaded kernelspecs, pools and quotas.

    ``clock`` gives unix seconds (tests pass a fake one); ``max_wait_s`` bounds how long a
    request may wait in a queue (kernelfleet.yaml's ``kernel_launch_timeout``).
    """

    def __init__(
        self,
        redis: Redis,
        *,
        pools: Mapping[str, Pool],
        kernelspecs: Mapping[str, KernelSpec],
        quotas: Quotas,
        location: str,
        clock: Callable[[], float] = time.time,
        max_wait_s: float = 60.0,
    ) -> None:
        self._redis = redis
        self._pools = pools
        self.kernelspecs = kernelspecs
        self.quotas = quotas
        self._location = location
        self._clock = clock
        self.max_wait_s = max_wait_s
        self._script = redis.register_script(lua.ADMIT)
        self._batcher = batcher_for(redis)
        self._prepared_args: dict[tuple[str, str, tuple[str, ...], bool, bool], _Prepared] = {}

    def kernelspec(self, name: str, groups: Iterable[str], *, admin: bool = False) -> KernelSpec:
        """The kernelspec ``name`` if this user may use it; raise otherwise."""
        spec = self.kernelspecs.get(name)
        if spec is None:
            raise UnknownKernelspec(messages.unknown_kernelspec(name, sorted(self.kernelspecs)))
        if not spec.allows(list(groups), admin=admin):
            raise KernelspecForbidden(messages.kernelspec_forbidden(name, spec.groups))
        return spec

    async def admit(
        self,
        *,
        kernel_id: str,
        user: str,
        groups: list[str],
        kernelspec: str,
        admin: bool = False,
        wait_s: float = 0.0,
        warm: bool = False,
    ) -> Admission | Queued:
        """Admit ``kernel_id`` of ``user`` from ``kernelspec``, queue it, or raise.

        With ``wait_s`` > 0 a request for a full pool waits in its queue (at most
        ``max_wait_s``) instead of being refused with ``pool_full``. ``warm``: a warm-pool
        kernel (``user`` is the warm pool's owner): it holds pool capacity, counts against no
        quota and never queues (see :mod:`scheduler.warm`).
        """
        spec, pool, args = self._prepared(kernelspec, user, groups, admin, warm)
        at = f"{self._clock():.3f}"  # the script stores this text; milliseconds, as Python's
        now = float(at)
        wait = 0.0 if warm else min(max(wait_s, 0.0), self.max_wait_s)
        deadline = float(f"{now + wait:.3f}") if wait > 0 else 0.0
        with unavailable_as(self._location):
            reply = await self._batcher.script(
                self._script, keys.ScriptKeys.kernel_part(kernel_id),
                (kernel_id, at, repr(deadline) if deadline else "0"),
                shared=keys.ScriptKeys.owner_part(user, pool.name), tail=args,
            )  # fmt: skip
        kind = reply[0]
        if kind == "exists":
            lease = Lease.from_redis(dict(zip(reply[1::2], reply[2::2], strict=True)))
            return Admission(lease=lease, env=kernel_env(lease), created=False)
        if kind == "admitted":
            res, devices = spec.resources, reply[1]
            lease = Lease.of(
                kernel_id=kernel_id, user=user, kernelspec=spec.name, pool=pool.name,
                cpus=res.cpus, memory=res.memory, gpus=res.gpus,
                gpu_devices=[int(d) for d in devices.split(",")] if devices else [],
                state="starting", created=now, last_activity=now, connections=0, waited=0.0,
                stopped=None, stop_reason=None,
            )  # fmt: skip
            log.info("admitted kernel %s of %s (%s) in pool %s, GPUs [%s]",
                     kernel_id, user, spec.name, pool.name, devices)  # fmt: skip
            # the script's device list is kernel_env's text already ("0,1"; "" without GPUs)
            return Admission(lease=lease, env={"CUDA_VISIBLE_DEVICES": devices}, created=True)
        if kind == "queued":
            log.info("queued kernel %s of %s (%s) for pool %s at position %s",
                     kernel_id, user, spec.name, pool.name, reply[1])  # fmt: skip
            return Queued(kernel_id=kernel_id, pool=pool.name, position=int(reply[1]),
                          deadline=deadline)  # fmt: skip
        if kind == "conflict":
            raise LeaseConflict(messages.lease_conflict(kernel_id))
        raise self.refusal(reply, spec=spec, groups=groups, admin=admin)

    def _prepared(
        self, kernelspec: str, user: str, groups: list[str], admin: bool, warm: bool
    ) -> tuple[KernelSpec, Pool, Packed]:
        """The kernelspec (checked for this user), its pool and ``ARGV[4..]`` (packed), made
        once per user, groups and kernelspec while the kernelspecs, pools and quotas stay."""
        key = (kernelspec, user, tuple(groups), admin, warm)
        found = self._prepared_args.get(key)
        spec = self.kernelspecs.get(kernelspec)
        if found is not None and found.spec is spec and found.quotas is self.quotas:
            pool = self._pools.get(found.spec.pool)
            if pool is found.pool:
                return found.spec, found.pool, found.args
        spec = self.kernelspec(kernelspec, groups, admin=admin or warm)
        pool = self._pools[spec.pool]
        quota = Quota() if warm else effective_quota(self.quotas, user, groups)
        args = Packed(admission_args(user=user, groups=groups, admin=admin, spec=spec,
                                     pool=pool, quota=quota, warm=warm))  # fmt: skip
        if len(self._prepared_args) >= _PREPARED_KEPT:
            self._prepared_args.clear()
        self._prepared_args[key] = _Prepared(spec, pool, self.quotas, args)
        return spec, pool, args

    def refusal(
        self, reply: Sequence[str], *, spec: KernelSpec, groups: Sequence[str], admin: bool
    ) -> SchedulerError:
        """The error for a ``quota``, ``pool`` or ``never`` reply of a script."""
        kind, field = reply[0], reply[1]
        used, limit = int(reply[2]), int(reply[3])
        pool = self._pools[spec.pool]
        alternative = self.alternative(groups, admin=admin) if spec.resources.gpus else None
        if kind == "quota":
            queued = int(reply[4]) if len(reply) > 4 else 0
            return QuotaExceeded(_quota_message(field, used, limit, queued, spec, alternative))
        res = spec.resources
        if kind == "never" and field != "gpus":
            need = from_milli(used) if field == "cpus_milli" else used
            cap = from_milli(limit) if field == "cpus_milli" else limit
            return PoolFull(
                messages.never_fits(
                    kernelspec=spec.name, pool=pool.name, resource=field, need=need, capacity=cap
                )
            )
        if field == "gpus":
            return PoolFull(
                messages.pool_gpus_full(
                    pool=pool.name, total=limit, free=used, need=res.gpus,
                    kernelspec=spec.name, alternative=alternative,
                )
            )  # fmt: skip
        if field == "queue":
            return PoolFull(messages.pool_queue_busy(pool=pool.name, waiting=used,
                                                     alternative=alternative))  # fmt: skip
        if field == "cpus_milli":
            return PoolFull(
                messages.pool_cpus_full(
                    pool=pool.name, used=from_milli(used), capacity=from_milli(limit),
                    need=res.cpus, kernelspec=spec.name,
                )
            )  # fmt: skip
        return PoolFull(
            messages.pool_memory_full(
                pool=pool.name, used=used, capacity=limit, need=res.memory, kernelspec=spec.name
            )
        )

    def alternative(self, groups: Sequence[str], *, admin: bool) -> str | None:
        """The first kernelspec without GPUs that this user may use, to suggest instead."""
        for name in sorted(self.kernelspecs):
            spec = self.kernelspecs[name]
            if spec.resources.gpus == 0 and spec.allows(list(groups), admin=admin):
                return name
        return None


def _quota_message(
    field: str, used: int, limit: int, queued: int, spec: KernelSpec, alternative: str | None
) -> str:
    """The user-facing text for a quota refusal on ``field``."""
    res = spec.resources
    if field == "kernels":
        return messages.kernels_quota(used=used, limit=limit, queued=queued)
    if field == "gpus":
        return messages.gpus_quota(used=used, limit=limit, need=res.gpus, kernelspec=spec.name)
    if field == "gpu_seconds":
        return messages.gpu_hours_quota(used_s=used, limit_s=limit, alternative=alternative)
    if field == "cpus_milli":
        return messages.cpus_quota(
            used=from_milli(used), limit=from_milli(limit), need=res.cpus, kernelspec=spec.name
        )
    return messages.memory_quota(used=used, limit=limit, need=res.memory, kernelspec=spec.name)
