"""Leases: what one kernel holds in its pool, how it is read back, listed and released.

A lease is the hash ``kf:lease:{kernel_id}`` (see :mod:`scheduler.keys`) with the fields
kernel_id, user, kernelspec, pool, cpus, cpus_milli, memory, gpus, gpu_devices (comma
separated device indexes), state, created and last_activity. It is indexed in
``kf:leases`` (scored by created time), the owner's and the pool's lease sets.
Admission creates it (:mod:`scheduler.admission`); release below deletes it and gives
back the counters and GPU devices in one Lua script.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from . import keys
from .store import unavailable_as

log = logging.getLogger(__name__)

LeaseState = Literal["starting", "idle", "busy"]

# KEYS: see keys.LeaseKeys.as_list(). ARGV: kernel_id, user, pool (as read just before).
# Returns {'released'}, {'gone'} (no such lease) or {'moved'} (owner/pool changed since
# the caller read them: read again and retry).
RELEASE_LUA = """
local lease = redis.call('HMGET', KEYS[1], 'user', 'pool', 'cpus_milli', 'memory', 'gpus',
                         'gpu_devices', 'state')
if not lease[1] then
  return {'gone'}
end
if lease[1] ~= ARGV[2] or lease[2] ~= ARGV[3] then
  return {'moved'}
end
local kid = ARGV[1]
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], kid)
redis.call('SREM', KEYS[3], kid)
redis.call('SREM', KEYS[5], kid)
local amounts = {kernels = 1, cpus_milli = tonumber(lease[3]) or 0,
                 memory = tonumber(lease[4]) or 0, gpus = tonumber(lease[5]) or 0}
for field, amount in pairs(amounts) do
  if amount ~= 0 then
    -- '%d': Redis rejects '-0' and exponent notation as integers
    local delta = string.format('%d', -amount)
    redis.call('HINCRBY', KEYS[4], field, delta)
    redis.call('HINCRBY', KEYS[6], field, delta)
  end
end
if (tonumber(redis.call('HGET', KEYS[4], 'kernels')) or 0) <= 0 then
  redis.call('DEL', KEYS[4])
end
redis.call('HINCRBY', KEYS[7], lease[7] or 'starting', -1)
local devices = tonumber(redis.call('HGET', KEYS[10], 'gpu_devices') or '0') or 0
for device in string.gmatch(lease[6] or '', '[^,]+') do
  if redis.call('HGET', KEYS[9], device) == kid then
    redis.call('HDEL', KEYS[9], device)
    if tonumber(device) < devices then
      redis.call('SADD', KEYS[8], device)
    end
  end
end
return {'released'}
"""

_MAX_RELEASE_TRIES = 3


class Lease(BaseModel):
    """One running (or starting) kernel holding resources in a pool (docs/contracts.md)."""

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

    @classmethod
    def from_redis(cls, fields: dict[str, str]) -> Lease:
        """A lease from its Redis hash."""
        devices = fields.get("gpu_devices", "")
        return cls(
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
        )


class LeaseStore:
    """Reads, lists and releases leases in Redis."""

    def __init__(self, redis: Redis, *, location: str) -> None:
        self._redis = redis
        self._location = location
        self._release = redis.register_script(RELEASE_LUA)

    async def get(self, kernel_id: str) -> Lease | None:
        """The lease of ``kernel_id``, or None."""
        with unavailable_as(self._location):
            fields = await self._redis.hgetall(keys.lease(kernel_id))
        return Lease.from_redis(fields) if fields else None

    async def release(self, kernel_id: str) -> bool:
        """Delete the lease and give back what it held; False if there was none.

        The owner and pool decide which keys the script touches, so they are read first;
        the script checks they did not change in between and the read is retried if so.
        """
        with unavailable_as(self._location):
            for _ in range(_MAX_RELEASE_TRIES):
                user, pool = await self._redis.hmget(keys.lease(kernel_id), ["user", "pool"])
                if user is None or pool is None:
                    return False
                lease_keys = keys.LeaseKeys.for_lease(kernel_id, user=user, pool=pool)
                reply = await self._release(keys=lease_keys.as_list(), args=[kernel_id, user, pool])
                if reply[0] != "moved":
                    released = reply[0] == "released"
                    if released:
                        log.info("released kernel %s of %s in pool %s", kernel_id, user, pool)
                    return released
        return False

    async def list(
        self, *, user: str | None = None, pool: str | None = None, kernelspec: str | None = None
    ) -> list[Lease]:
        """Leases oldest first, filtered by owner, pool and kernelspec (all optional).

        Uses the per-user and per-pool sets (or the created-time index) - never a scan.
        """
        with unavailable_as(self._location):
            kernel_ids = await self._candidate_ids(user=user, pool=pool)
            if not kernel_ids:
                return []
            pipe = self._redis.pipeline(transaction=False)
            for kernel_id in kernel_ids:
                pipe.hgetall(keys.lease(kernel_id))
            rows = await pipe.execute()
        leases = [Lease.from_redis(row) for row in rows if row]
        if kernelspec is not None:
            leases = [lease for lease in leases if lease.kernelspec == kernelspec]
        return sorted(leases, key=lambda lease: (lease.created, lease.kernel_id))

    async def _candidate_ids(self, *, user: str | None, pool: str | None) -> list[str]:
        if user is not None and pool is not None:
            found = await self._redis.sinter([keys.user_leases(user), keys.pool_leases(pool)])
            return list(found)
        if user is not None:
            return list(await self._redis.smembers(keys.user_leases(user)))
        if pool is not None:
            return list(await self._redis.smembers(keys.pool_leases(pool)))
        return list(await self._redis.zrange(keys.LEASES, 0, -1))
