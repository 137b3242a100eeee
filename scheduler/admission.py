"""Admission: may this user start this kernel now? One atomic Redis round trip decides.

The Lua script below checks the user's effective quota (kernels, and cpus, memory and
gpus where the quota sets them) and the pool's capacity (cpus, memory, and GPUs counted
as devices in a free-device set), picks the lowest free GPU devices, creates the lease
with its indexes and updates the user's and the pool's counters - or refuses and says
which limit was hit. Python turns a refusal into a message the user can act on
(:mod:`scheduler.messages`). Admitting the same kernel id again returns the same lease.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from redis.asyncio import Redis

from kernelfleet.config import Quota, Quotas
from kernelfleet.kernelspecs.spec import KernelSpec

from . import keys, messages
from .errors import (
    KernelspecForbidden,
    LeaseConflict,
    PoolFull,
    QuotaExceeded,
    SchedulerError,
    UnknownKernelspec,
)
from .leases import Lease
from .pools import Pool, from_milli, to_milli
from .quotas import effective_quota
from .store import unavailable_as

log = logging.getLogger(__name__)

UNLIMITED = -1

# KEYS: see keys.LeaseKeys.as_list().
# ARGV: 1 kernel_id, 2 user, 3 kernelspec, 4 pool, 5 cpus, 6 cpus_milli, 7 memory, 8 gpus,
#       9 now, 10-13 quota kernels/cpus_milli/memory/gpus (-1 = unlimited),
#       14-16 pool capacity cpus_milli/memory/gpu devices.
# Returns {'admitted', devices}, {'exists', field, value, ...}, {'conflict'},
#         {'quota', field, used, limit} or {'pool', field, used_or_free, capacity}.
ADMIT_LUA = """
local existing = redis.call('HGETALL', KEYS[1])
if #existing > 0 then
  local lease = {}
  for i = 1, #existing, 2 do lease[existing[i]] = existing[i + 1] end
  if lease['user'] ~= ARGV[2] or lease['kernelspec'] ~= ARGV[3] then
    return {'conflict'}
  end
  table.insert(existing, 1, 'exists')
  return existing
end

local need = {kernels = 1, cpus_milli = tonumber(ARGV[6]), memory = tonumber(ARGV[7]),
              gpus = tonumber(ARGV[8])}
local limits = {kernels = tonumber(ARGV[10]), gpus = tonumber(ARGV[13]),
                cpus_milli = tonumber(ARGV[11]), memory = tonumber(ARGV[12])}
local order = {'kernels', 'gpus', 'cpus_milli', 'memory'}
for _, field in ipairs(order) do
  local limit = limits[field]
  if limit >= 0 and need[field] > 0 then
    local used = tonumber(redis.call('HGET', KEYS[4], field)) or 0
    if used + need[field] > limit then
      return {'quota', field, used, limit}
    end
  end
end

local devices = tonumber(ARGV[16])
local synced = tonumber(redis.call('HGET', KEYS[10], 'gpu_devices') or '-1')
if synced ~= devices then
  -- first use, Redis lost its data, or the device count changed: rebuild the free set
  redis.call('DEL', KEYS[8])
  for d = 0, devices - 1 do
    if redis.call('HEXISTS', KEYS[9], tostring(d)) == 0 then
      redis.call('SADD', KEYS[8], tostring(d))
    end
  end
  redis.call('HSET', KEYS[10], 'gpu_devices', devices)
end

local capacity = {cpus_milli = tonumber(ARGV[14]), memory = tonumber(ARGV[15])}
for _, field in ipairs({'cpus_milli', 'memory'}) do
  if need[field] > 0 then
    local used = tonumber(redis.call('HGET', KEYS[6], field)) or 0
    if used + need[field] > capacity[field] then
      return {'pool', field, used, capacity[field]}
    end
  end
end

local picked = {}
if need.gpus > 0 then
  local free = redis.call('SMEMBERS', KEYS[8])
  if #free < need.gpus then
    return {'pool', 'gpus', #free, devices}
  end
  table.sort(free, function(a, b) return tonumber(a) < tonumber(b) end)
  for i = 1, need.gpus do
    picked[i] = free[i]
    redis.call('SREM', KEYS[8], free[i])
    redis.call('HSET', KEYS[9], free[i], ARGV[1])
  end
end
local gpu_devices = table.concat(picked, ',')

redis.call('HSET', KEYS[1], 'kernel_id', ARGV[1], 'user', ARGV[2], 'kernelspec', ARGV[3],
           'pool', ARGV[4], 'cpus', ARGV[5], 'cpus_milli', ARGV[6], 'memory', ARGV[7],
           'gpus', ARGV[8], 'gpu_devices', gpu_devices, 'state', 'starting',
           'created', ARGV[9], 'last_activity', ARGV[9])
redis.call('ZADD', KEYS[2], ARGV[9], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[5], ARGV[1])
local amounts = {kernels = '1', cpus_milli = ARGV[6], memory = ARGV[7], gpus = ARGV[8]}
for field, amount in pairs(amounts) do
  redis.call('HINCRBY', KEYS[4], field, amount)
  redis.call('HINCRBY', KEYS[6], field, amount)
end
redis.call('HINCRBY', KEYS[7], 'starting', 1)
return {'admitted', gpu_devices}
"""


@dataclass(frozen=True)
class Admission:
    """An admitted kernel: its lease, the env it must get, and whether it was new."""

    lease: Lease
    env: dict[str, str]
    created: bool


def kernel_env(lease: Lease) -> dict[str, str]:
    """The env a kernel must get: its GPU devices, or none visible ("") without GPUs."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in lease.gpu_devices)}


def _limit(value: float | None, *, scale: Callable[[float], int] = int) -> str:
    return str(UNLIMITED if value is None else scale(value))


def _quota_args(quota: Quota) -> list[str]:
    """ARGV 10-13: the quota's kernels, cpus (milli), memory and gpus limits."""
    return [
        _limit(quota.kernels),
        _limit(quota.cpus, scale=to_milli),
        _limit(quota.memory),
        _limit(quota.gpus),
    ]


def _script_args(
    kernel_id: str, user: str, spec: KernelSpec, pool: Pool, quota: Quota, *, now: float
) -> list[str]:
    """ARGV of ADMIT_LUA, in the order its header comment gives."""
    res = spec.resources
    return [
        kernel_id, user, spec.name, pool.name, repr(float(res.cpus)),
        str(to_milli(res.cpus)), str(res.memory), str(res.gpus), repr(now),
        *_quota_args(quota),
        str(pool.cpus_milli), str(pool.memory), str(pool.gpus),
    ]  # fmt: skip


class Admitter:
    """Decides admissions against the loaded kernelspecs, pools and quotas.

    ``clock`` gives unix seconds; tests pass a fake one.
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
    ) -> None:
        self._redis = redis
        self._pools = pools
        self._kernelspecs = kernelspecs
        self._quotas = quotas
        self._location = location
        self._clock = clock
        self._script = redis.register_script(ADMIT_LUA)

    def kernelspec(self, name: str, groups: Iterable[str], *, admin: bool = False) -> KernelSpec:
        """The kernelspec ``name`` if this user may use it; raise otherwise."""
        spec = self._kernelspecs.get(name)
        if spec is None:
            raise UnknownKernelspec(messages.unknown_kernelspec(name, sorted(self._kernelspecs)))
        if not spec.allows(list(groups), admin=admin):
            raise KernelspecForbidden(messages.kernelspec_forbidden(name, spec.groups))
        return spec

    async def admit(
        self, *, kernel_id: str, user: str, groups: list[str], kernelspec: str, admin: bool = False
    ) -> Admission:
        """Admit ``kernel_id`` of ``user`` from ``kernelspec``, or raise a SchedulerError."""
        spec = self.kernelspec(kernelspec, groups, admin=admin)
        pool = self._pools[spec.pool]
        quota = effective_quota(self._quotas, user, groups)
        now = round(self._clock(), 3)
        args = _script_args(kernel_id, user, spec, pool, quota, now=now)
        lease_keys = keys.LeaseKeys.for_lease(kernel_id, user=user, pool=pool.name)
        with unavailable_as(self._location):
            reply = await self._script(keys=lease_keys.as_list(), args=args)
        if reply[0] == "exists":
            lease = Lease.from_redis(dict(zip(reply[1::2], reply[2::2], strict=True)))
            return Admission(lease=lease, env=kernel_env(lease), created=False)
        if reply[0] == "admitted":
            res = spec.resources
            lease = Lease(
                kernel_id=kernel_id, user=user, kernelspec=spec.name, pool=pool.name,
                cpus=res.cpus, memory=res.memory, gpus=res.gpus,
                gpu_devices=[int(d) for d in reply[1].split(",") if d],
                state="starting", created=now, last_activity=now,
            )  # fmt: skip
            log.info(
                "admitted kernel %s of %s (%s) in pool %s, GPUs [%s]",
                kernel_id, user, spec.name, pool.name, reply[1],
            )  # fmt: skip
            return Admission(lease=lease, env=kernel_env(lease), created=True)
        if reply[0] == "conflict":
            raise LeaseConflict(messages.lease_conflict(kernel_id))
        raise self._refusal(reply, spec=spec, pool=pool, groups=groups, admin=admin)

    def _refusal(
        self, reply: list, *, spec: KernelSpec, pool: Pool, groups: list[str], admin: bool
    ) -> SchedulerError:
        """The error for a quota or pool refusal reply of the script."""
        kind, field, used, limit = reply[0], reply[1], int(reply[2]), int(reply[3])
        if kind == "quota":
            return QuotaExceeded(_quota_message(field, used, limit, spec))
        if field == "gpus":
            alternative = self._cpu_alternative(groups, admin=admin)
            return PoolFull(
                messages.pool_gpus_full(
                    pool=pool.name, total=limit, free=used, need=spec.resources.gpus,
                    kernelspec=spec.name, alternative=alternative,
                )
            )  # fmt: skip
        if field == "cpus_milli":
            return PoolFull(
                messages.pool_cpus_full(
                    pool=pool.name, used=from_milli(used), capacity=from_milli(limit),
                    need=spec.resources.cpus, kernelspec=spec.name,
                )
            )  # fmt: skip
        return PoolFull(
            messages.pool_memory_full(
                pool=pool.name, used=used, capacity=limit, need=spec.resources.memory,
                kernelspec=spec.name,
            )
        )  # fmt: skip

    def _cpu_alternative(self, groups: list[str], *, admin: bool) -> str | None:
        """The first kernelspec without GPUs that this user may use, to suggest instead."""
        for name in sorted(self._kernelspecs):
            spec = self._kernelspecs[name]
            if spec.resources.gpus == 0 and spec.allows(groups, admin=admin):
                return name
        return None


def _quota_message(field: str, used: int, limit: int, spec: KernelSpec) -> str:
    """The user-facing text for a quota refusal on ``field``."""
    res = spec.resources
    if field == "kernels":
        return messages.kernels_quota(used=used, limit=limit)
    if field == "gpus":
        return messages.gpus_quota(used=used, limit=limit, need=res.gpus, kernelspec=spec.name)
    if field == "cpus_milli":
        return messages.cpus_quota(
            used=from_milli(used), limit=from_milli(limit), need=res.cpus, kernelspec=spec.name
        )
    return messages.memory_quota(used=used, limit=limit, need=res.memory, kernelspec=spec.name)
