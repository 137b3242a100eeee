"""Leases: what one kernel holds in its pool, how it is read back, listed and released.

A lease is the hash ``kf:lease:{kernel_id}`` (see :mod:`scheduler.keys`) with the fields
kernel_id, user, kernelspec, pool, cpus, cpus_milli, memory, gpus, gpu_devices (comma
separated device indexes), state, created, last_activity, connections, waited (seconds it
queued) and gpu_seconds_limit (the owner's GPU-hour quota when admitted, -1 unlimited);
a field at its default (no GPU devices, waited 0, last activity = created, 0 connections)
is not written, and :meth:`Lease.from_redis` fills it in. It is indexed in ``kf:leases``
(scored by created time, whole seconds), the owner's and the pool's lease
sets. Admission creates it (:mod:`scheduler.admission`), activity reports move its state
(:mod:`scheduler.activity`), and release below deletes it, gives back the counters and GPU
devices, accounts its GPU time and keeps a ``stopped`` copy for a while - one Lua script
(copies older than :data:`STOPPED_KEEP_S` are deleted by :meth:`LeaseStore.trim_stopped`,
one of the scheduler's background steps).

States: ``starting`` (admitted, kernel launching) -> ``idle`` / ``busy`` (from the gateway's
activity reports) -> ``stopped`` (released; listed for :data:`STOPPED_KEEP_S`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from . import keys, lua
from .batching import Arg, batcher_for
from .store import unavailable_as

log = logging.getLogger(__name__)

LeaseState = Literal["starting", "idle", "busy", "stopped"]
LIVE_STATES: tuple[str, ...] = ("starting", "idle", "busy")
#: Seconds a stopped lease stays listed (``GET /v1/leases?state=stopped``).
STOPPED_KEEP_S = 3600
#: The rolling window of GPU-hour quotas.
GPU_WINDOW_S = 24 * 3600
_MAX_RELEASE_TRIES = 3
_OWNERS_KEPT = 20_000  # owner hints kept (see LeaseStore.remember): a few MB


class Lease(BaseModel):
    """One running (or starting, or recently stopped) kernel and what it holds in its pool."""

    kernel_id: str
    user: str
    kernelspec: str
    pool: str
    cpus: float
    memory: int = Field(description="bytes")
    gpus: int
    gpu_devices: list[int]
    state: LeaseState
    created: float = Field(description="unix seconds")
    last_activity: float = Field(description="unix seconds")
    connections: int = Field(0, description="open channels websockets (from the gateway)")
    waited: float = Field(0.0, description="seconds the admission waited in the pool's queue")
    stopped: float | None = Field(None, description="unix seconds; only for stopped leases")
    stop_reason: str | None = Field(
        None, description="released, died, reconciled, gpu_hours_exhausted (stopped leases)"
    )

    @classmethod
    def of(cls, **values: Any) -> Lease:
        """A lease from values the scheduler made itself, *every* field given, not validated:
        what ``model_construct`` does, without its alias and default lookups per field
        (~10 us less; every admission builds one, a lease listing thousands)."""
        if values.keys() != _FIELDS:
            raise TypeError(f"Lease.of takes exactly the fields {sorted(_FIELDS)}, "
                            f"not {sorted(values)}")  # fmt: skip
        lease = cls.__new__(cls)
        _set(lease, "__dict__", values)
        _set(lease, "__pydantic_fields_set__", set(_FIELDS))
        _set(lease, "__pydantic_extra__", None)
        _set(lease, "__pydantic_private__", None)
        return lease

    @classmethod
    def from_redis(cls, fields: dict[str, str]) -> Lease:
        """A lease from its Redis hash (the scheduler's own writing: converted, not
        validated again)."""
        devices = fields.get("gpu_devices", "")
        stopped = fields.get("stopped")
        return cls.of(
            kernel_id=fields["kernel_id"],
            user=fields["user"],
            kernelspec=fields["kernelspec"],
            pool=fields["pool"],
            cpus=float(fields["cpus"]),
            memory=int(fields["memory"]),
            gpus=int(fields["gpus"]),
            gpu_devices=[int(d) for d in devices.split(",") if d],
            state=fields.get("state", "starting"),  # type: ignore[arg-type]
            created=float(fields["created"]),
            last_activity=float(fields.get("last_activity", fields["created"])),
            connections=int(fields.get("connections", 0)),
            waited=float(fields.get("waited", 0)),
            stopped=float(stopped) if stopped else None,
            stop_reason=fields.get("stop_reason"),
        )


_FIELDS = frozenset(Lease.model_fields)
_set = object.__setattr__


@dataclass(frozen=True)
class Released:
    """A released lease's pool, and how many requests waited for it right after.

    (The lease itself stays readable as ``state="stopped"`` for :data:`STOPPED_KEEP_S`.)
    """

    pool: str
    waiting: int


class LeaseStore:
    """Reads, lists and releases leases in Redis. ``clock`` gives unix seconds."""

    def __init__(
        self, redis: Redis, *, location: str, clock: Callable[[], float] = time.time
    ) -> None:
        self._redis = redis
        self._location = location
        self._clock = clock
        self._release = redis.register_script(lua.RELEASE)
        self._trim = redis.register_script(lua.TRIM_STOPPED)
        self._batcher = batcher_for(redis)
        self._owners: dict[str, tuple[str, str]] = {}  # kernel_id -> (user, pool), a hint

    async def get(self, kernel_id: str) -> Lease | None:
        """The live lease of ``kernel_id``, or None."""
        with unavailable_as(self._location):
            fields = await self._redis.hgetall(keys.lease(kernel_id))
        return Lease.from_redis(fields) if fields else None

    def remember(self, kernel_id: str, *, user: str, pool: str) -> None:
        """Note whose ``kernel_id`` is and where, so its release needs no read first.

        Only a hint: the release script checks it and a stale one costs one read.
        """
        owners = self._owners
        owners.pop(kernel_id, None)
        owners[kernel_id] = (user, pool)
        if len(owners) > _OWNERS_KEPT:
            del owners[next(iter(owners))]  # the oldest

    async def release(self, kernel_id: str, *, reason: str = "released") -> Released | None:
        """Delete the lease and give back what it held; its pool and how many requests then
        waited for that pool, or None when there was no lease.

        The owner and pool decide which keys the script touches: they come from
        :meth:`remember` or are read first; the script checks they are still right, and the
        read is (re)done if not.
        """
        owner = self._owners.pop(kernel_id, None)
        with unavailable_as(self._location):
            for _ in range(_MAX_RELEASE_TRIES):
                if owner is None:
                    user, pool = await self._batcher.command(
                        "HMGET", keys.lease(kernel_id), "user", "pool"
                    )
                    if user is None or pool is None:
                        return None
                    owner = user, pool
                user, pool = owner
                args: list[Arg] = [kernel_id, user, pool, f"{self._clock():.3f}", reason,
                                   GPU_WINDOW_S]  # fmt: skip
                reply = await self._batcher.script(
                    self._release, keys.ScriptKeys.kernel_part(kernel_id), args,
                    shared=keys.ScriptKeys.owner_part(user, pool),
                )  # fmt: skip
                if reply[0] == "gone":
                    return None
                if reply[0] == "released":
                    log.info("released kernel %s of %s in pool %s (%s)",
                             kernel_id, user, pool, reason)  # fmt: skip
                    return Released(pool=pool, waiting=int(reply[1]))
                owner = None  # moved: read the owner and pool again
        return None

    async def list(
        self,
        *,
        user: str | None = None,
        pool: str | None = None,
        kernelspec: str | None = None,
        state: str | None = None,
    ) -> list[Lease]:
        """Leases oldest first, filtered by owner, pool, kernelspec and state (all optional).

        Live leases come from the per-user and per-pool sets (or the created-time index);
        ``state="stopped"`` lists those stopped within :data:`STOPPED_KEEP_S` - never a scan.
        """
        with unavailable_as(self._location):
            if state == "stopped":  # not yet trimmed ones too old to list are left out
                since = self._clock() - STOPPED_KEEP_S
                kernel_ids = list(await self._redis.zrangebyscore(keys.STOPPED, since, "+inf"))
                key_of = keys.stopped
            else:
                kernel_ids = await self._candidate_ids(user=user, pool=pool)
                key_of = keys.lease
            if not kernel_ids:
                return []
            pipe = self._redis.pipeline(transaction=False)
            for kernel_id in kernel_ids:
                pipe.hgetall(key_of(kernel_id))
            rows = await pipe.execute()
        leases = [Lease.from_redis(row) for row in rows if row]
        leases = [
            lease
            for lease in leases
            if (user is None or lease.user == user)
            and (pool is None or lease.pool == pool)
            and (kernelspec is None or lease.kernelspec == kernelspec)
            and (state is None or lease.state == state)
        ]
        return sorted(leases, key=lambda lease: (lease.created, lease.kernel_id))

    async def trim_stopped(self, *, batch: int = 500) -> int:
        """Delete the stopped copies older than :data:`STOPPED_KEEP_S` (a release keeps one
        and indexes it; nothing expires by itself). How many went."""
        cutoff = round(self._clock() - STOPPED_KEEP_S, 3)
        trimmed = 0
        with unavailable_as(self._location):
            while True:
                old = await self._redis.zrangebyscore(keys.STOPPED, "-inf", f"({cutoff}",
                                                      start=0, num=batch)  # fmt: skip
                if not old:
                    return trimmed
                went = await self._trim(keys=[keys.STOPPED, *map(keys.stopped, old)],
                                        args=[repr(cutoff), *old])  # fmt: skip
                trimmed += int(went)
                if int(went) < len(old):  # stopped again meanwhile: newer now, kept
                    return trimmed

    async def _candidate_ids(self, *, user: str | None, pool: str | None) -> list[str]:
        if user is not None and pool is not None:
            found = await self._redis.sinter([keys.user_leases(user), keys.pool_leases(pool)])
            return list(found)
        if user is not None:
            return list(await self._redis.smembers(keys.user_leases(user)))
        if pool is not None:
            return list(await self._redis.smembers(keys.pool_leases(pool)))
        return list(await self._redis.zrange(keys.LEASES, 0, -1))
