"""The scheduler's Redis Lua scripts: every decision that touches several keys is one of these.

Each script starts with the same prelude: ``K``, the keys of one kernel by name (bound from
``KEYS`` by :meth:`scheduler.keys.ScriptKeys.lua_bindings`, so Python and Lua agree on
positions), and a few shared functions. Decisions that need the clock get ``now`` from
Python (the scheduler's injectable clock); no script reads Redis' own time.

Admission arguments: ``ARGV[1]`` is one JSON object, the same for every request of a user
for a kernelspec (built once by :func:`scheduler.admission.admission_args`, and kept with a
queued request): ``user, kernelspec, pool, cpus`` (text), ``cpus_milli, memory, gpus``
(numbers), ``groups`` (JSON text), ``admin``, ``warm`` (bools), ``window`` (seconds of the
GPU-hour window), ``quota``: ``{kernels, cpus_milli, memory, gpus, gpu_seconds}`` (-1 =
unlimited), ``capacity``: ``{cpus_milli, memory, gpus}``. ``ARGV[2..4]``: ``kernel_id``,
``now``, ``deadline`` (0: do not queue).

Replies are flat lists whose first element names the outcome:

- ``{'admitted', devices}`` / ``{'exists', field, value, ...}`` / ``{'conflict'}``
- ``{'queued', position}``
- ``{'quota', field, used, limit, queued}``: field is kernels, gpus, cpus_milli, memory or
  gpu_seconds; ``queued`` is how many of the user's requests wait (kernels only)
- ``{'pool', field, used_or_free, capacity}``: field is cpus_milli, memory, gpus (then the
  number of free devices) or queue (then how many requests already wait)
- ``{'never', field, need, capacity}``: the kernelspec can never fit in the pool
"""

from __future__ import annotations

from .keys import ScriptKeys

#: Seconds a finished queue entry (admitted, refused, timed out, left) stays readable.
ENTRY_TTL_S = 600

_PRELUDE = (
    ScriptKeys.lua_bindings()
    + """
local function num(v) return tonumber(v) or 0 end
-- '%d' and '%.3f': Redis rejects '-0' and exponent notation as integers
local function int(v) return string.format('%d', math.floor(v + 0.5)) end
local function ts(v) return string.format('%.3f', v) end

-- GPU-seconds the user held in (now - window, now]: ended leases, then running ones.
local function gpu_seconds(now, window)
  local since = now - window
  redis.call('ZREMRANGEBYSCORE', K.gpu_done, '-inf', '(' .. ts(since))
  local total = 0
  local done = redis.call('ZRANGE', K.gpu_done, 0, -1, 'WITHSCORES')
  for i = 1, #done, 2 do
    local gpus, start = string.match(done[i], '^(%d+)|([^|]+)|')
    local stop = tonumber(done[i + 1])
    total = total + tonumber(gpus) * math.max(0, stop - math.max(tonumber(start), since))
  end
  local running = redis.call('ZRANGE', K.gpu_running, 0, -1, 'WITHSCORES')
  for i = 1, #running, 2 do
    local gpus = string.match(running[i], '^(%d+)|')
    local start = tonumber(running[i + 1])
    total = total + tonumber(gpus) * math.max(0, now - math.max(start, since))
  end
  return total
end

-- The user's groups and admin flag as of this request, for usage reports (written only
-- when they changed).
local function remember_profile(a)
  local admin = '0'
  if a.admin then admin = '1' end
  local known = redis.call('HMGET', K.profile, 'groups', 'admin')
  if known[1] ~= a.groups or known[2] ~= admin then
    redis.call('HSET', K.profile, 'groups', a.groups, 'admin', admin)
  end
end

-- What a user or pool holds, read in one call: {kernels, cpus_milli, memory, gpus}.
local USAGE = {'kernels', 'cpus_milli', 'memory', 'gpus'}
local function usage(key)
  local v = redis.call('HMGET', key, unpack(USAGE))
  return {kernels = num(v[1]), cpus_milli = num(v[2]), memory = num(v[3]), gpus = num(v[4])}
end

-- Write `held` plus `sign` times one kernel like `a` back to `key` in one call.
local function add_usage(key, held, a, sign)
  redis.call('HSET', key, 'kernels', int(held.kernels + sign),
             'cpus_milli', int(held.cpus_milli + sign * a.cpus_milli),
             'memory', int(held.memory + sign * a.memory), 'gpus', int(held.gpus + sign * a.gpus))
end

-- nil when the user, holding `held`, may hold one more kernel like `a`, else the refusal.
local function check_quota(a, queued, held)
  local need = {kernels = 1, cpus_milli = a.cpus_milli, memory = a.memory, gpus = a.gpus}
  for _, field in ipairs({'kernels', 'gpus', 'cpus_milli', 'memory'}) do
    local limit = a.quota[field]
    if limit >= 0 and need[field] > 0 then
      local used = held[field]
      local waiting = 0
      if field == 'kernels' then waiting = queued end
      if used + waiting + need[field] > limit then
        return {'quota', field, int(used), int(limit), int(waiting)}
      end
    end
  end
  if a.gpus > 0 and a.quota.gpu_seconds >= 0 then
    local used = gpu_seconds(a.now, a.window)
    if used >= a.quota.gpu_seconds then
      return {'quota', 'gpu_seconds', int(used), int(a.quota.gpu_seconds), '0'}
    end
  end
  return nil
end

-- Rebuild the free-device set on first use, after Redis lost its data, or when the
-- pool's device count changed.
-- Requests without GPUs in a pool without GPUs never read the set: nothing to do.
local function sync_gpus(devices, a)
  if devices == 0 and a.gpus == 0 then return end
  local synced = tonumber(redis.call('HGET', K.pool_meta, 'gpu_devices') or '-1')
  if synced ~= devices then
    redis.call('DEL', K.gpus_free)
    for d = 0, devices - 1 do
      if redis.call('HEXISTS', K.gpus_held, tostring(d)) == 0 then
        redis.call('SADD', K.gpus_free, tostring(d))
      end
    end
    redis.call('HSET', K.pool_meta, 'gpu_devices', devices)
  end
end

-- nil unless `a` needs more than the whole pool has.
local function never_fits(a)
  for _, field in ipairs({'gpus', 'cpus_milli', 'memory'}) do
    if a[field] > a.capacity[field] then
      if field == 'gpus' then
        return {'pool', 'gpus', int(redis.call('SCARD', K.gpus_free)), int(a.capacity.gpus)}
      end
      return {'never', field, int(a[field]), int(a.capacity[field])}
    end
  end
  return nil
end

-- nil when the pool, holding `held`, has room for `a` now, else the 'pool' reply.
local function check_capacity(a, held)
  for _, field in ipairs({'cpus_milli', 'memory'}) do
    if a[field] > 0 and held[field] + a[field] > a.capacity[field] then
      return {'pool', field, int(held[field]), int(a.capacity[field])}
    end
  end
  if a.gpus > 0 then
    local free = redis.call('SCARD', K.gpus_free)
    if free < a.gpus then return {'pool', 'gpus', int(free), int(a.capacity.gpus)} end
  end
  return nil
end

-- The lowest free GPU devices, taken; '' without GPUs.
local function take_gpus(a)
  if a.gpus == 0 then return '' end
  local free = redis.call('SMEMBERS', K.gpus_free)
  table.sort(free, function(x, y) return tonumber(x) < tonumber(y) end)
  local picked = {}
  for i = 1, a.gpus do
    picked[i] = free[i]
    redis.call('SREM', K.gpus_free, free[i])
    redis.call('HSET', K.gpus_held, free[i], a.kernel_id)
  end
  return table.concat(picked, ',')
end

-- `user_held`, `pool_held`: the usage read by the checks just before.
local function create_lease(a, devices, waited, user_held, pool_held)
  local now = ts(a.now)
  redis.call('HSET', K.lease, 'kernel_id', a.kernel_id, 'user', a.user,
             'kernelspec', a.kernelspec, 'pool', a.pool, 'cpus', a.cpus,
             'cpus_milli', int(a.cpus_milli), 'memory', int(a.memory), 'gpus', int(a.gpus),
             'gpu_devices', devices, 'state', 'starting', 'created', now,
             'last_activity', now, 'connections', '0',
             'gpu_seconds_limit', int(a.quota.gpu_seconds), 'waited', ts(waited))
  redis.call('ZADD', K.leases, now, a.kernel_id)
  redis.call('SADD', K.user_leases, a.kernel_id)
  redis.call('SADD', K.pool_leases, a.kernel_id)
  add_usage(K.user_usage, user_held, a, 1)
  add_usage(K.pool_usage, pool_held, a, 1)
  redis.call('HINCRBY', K.pool_states, 'starting', 1)
  if a.gpus > 0 then
    redis.call('ZADD', K.gpu_running, now, int(a.gpus) .. '|' .. a.kernel_id)
  end
end

-- Start-time fair queueing: a request's tag is one more than the larger of the pool's
-- virtual time (tag of the request served last) and the user's own last waiting tag, so
-- users take turns; equal tags are served in arrival order (seq).
local function enqueue(a)
  local tag = num(redis.call('HGET', K.queue_meta, 'vtime'))
  local last = redis.call('ZRANGE', K.queue_user, -1, -1, 'WITHSCORES')
  if #last > 0 and tonumber(last[2]) > tag then tag = tonumber(last[2]) end
  tag = tag + 1
  local seq = redis.call('HINCRBY', K.queue_meta, 'seq', 1)
  local member = string.format('%015d', seq) .. '|' .. a.kernel_id
  redis.call('ZADD', K.queue, tag, member)
  redis.call('ZADD', K.queue_user, tag, a.kernel_id)
  redis.call('SADD', K.user_queued, a.kernel_id)
  redis.call('ZADD', K.deadlines, ts(a.deadline), a.kernel_id)
  redis.call('ZADD', K.seen, ts(a.now), a.kernel_id)
  redis.call('DEL', K.entry)
  redis.call('HSET', K.entry, 'kernel_id', a.kernel_id, 'user', a.user,
             'kernelspec', a.kernelspec, 'pool', a.pool, 'member', member, 'tag', int(tag),
             'enqueued', ts(a.now), 'deadline', ts(a.deadline), 'state', 'waiting',
             'args', ARGV[1])
  return redis.call('ZRANK', K.queue, member) + 1
end

local function dequeue(member, kid, state, now, extra)
  redis.call('ZREM', K.queue, member)
  redis.call('ZREM', K.queue_user, kid)
  redis.call('SREM', K.user_queued, kid)
  redis.call('ZREM', K.deadlines, kid)
  redis.call('ZREM', K.seen, kid)
  redis.call('HSET', K.entry, 'state', state, 'finished', ts(now), unpack(extra))
  redis.call('EXPIRE', K.entry, ENTRY_TTL)
end

local function served(tag)
  if num(tag) > num(redis.call('HGET', K.queue_meta, 'vtime')) then
    redis.call('HSET', K.queue_meta, 'vtime', tag)
  end
end
""".replace("ENTRY_TTL", str(ENTRY_TTL_S))
)

# A new request: the same kernel id again is idempotent (its lease, or its queue place).
ADMIT = (
    _PRELUDE
    + """
local a = cjson.decode(ARGV[1])
a.kernel_id, a.now, a.deadline = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('EXISTS', K.lease, K.entry) > 0 then  -- asked before: same answer
  local existing = redis.call('HGETALL', K.lease)
  if #existing > 0 then
    local lease = {}
    for i = 1, #existing, 2 do lease[existing[i]] = existing[i + 1] end
    if lease['user'] ~= a.user or lease['kernelspec'] ~= a.kernelspec then
      return {'conflict'}
    end
    table.insert(existing, 1, 'exists')
    return existing
  end
  local entry = redis.call('HMGET', K.entry, 'state', 'member', 'user', 'kernelspec')
  if entry[1] == 'waiting' then
    if entry[3] ~= a.user or entry[4] ~= a.kernelspec then return {'conflict'} end
    return {'queued', redis.call('ZRANK', K.queue, entry[2]) + 1}
  end
end
if not a.warm then  -- warm kernels belong to nobody yet: no profile, not a user
  remember_profile(a)
end

local user_held = usage(K.user_usage)
local refusal = check_quota(a, redis.call('SCARD', K.user_queued), user_held)
if refusal then return refusal end
sync_gpus(a.capacity.gpus, a)
local never = never_fits(a)
if never then return never end
local full, pool_held
local waiting = redis.call('ZCARD', K.queue)
if waiting > 0 then
  full = {'pool', 'queue', int(waiting), '0'}  -- no jumping the queue
else
  pool_held = usage(K.pool_usage)
  full = check_capacity(a, pool_held)
end
if full then
  if a.deadline > a.now then return {'queued', enqueue(a)} end
  return full
end
local devices = take_gpus(a)
create_lease(a, devices, 0, user_held, pool_held)
return {'admitted', devices}
"""
)

# The head of a pool's queue, if it is still ARGV[1] (its member): admit it when it fits,
# refuse it when its quota no longer allows it, else leave it waiting.
# ARGV[2]: JSON {now, capacity}. Replies: {'admitted', devices, waited}, {'wait'},
# {'stale'} / {'not_head'} (read the head again), or a 'quota'/'never' refusal.
PROMOTE = (
    _PRELUDE
    + """
local head = redis.call('ZRANGE', K.queue, 0, 0)
if head[1] ~= ARGV[1] then return {'not_head'} end
local e = redis.call('HMGET', K.entry, 'state', 'member', 'args', 'enqueued', 'tag',
                     'kernel_id')
if e[1] ~= 'waiting' or e[2] ~= ARGV[1] then
  redis.call('ZREM', K.queue, ARGV[1])  -- a place without a waiting request: drop it
  return {'stale'}
end
local a = cjson.decode(e[3])
a.kernel_id = e[6]
local now_and_capacity = cjson.decode(ARGV[2])
a.now = now_and_capacity.now
a.capacity = now_and_capacity.capacity
local waited = math.max(0, a.now - tonumber(e[4]))
if redis.call('EXISTS', K.lease) == 1 then
  dequeue(e[2], a.kernel_id, 'admitted', a.now, {'waited', ts(waited)})
  return {'admitted', redis.call('HGET', K.lease, 'gpu_devices') or '', ts(waited)}
end
-- this request is among the user's waiting ones: it does not count against itself
local user_held = usage(K.user_usage)
local refusal = check_quota(a, redis.call('SCARD', K.user_queued) - 1, user_held)
sync_gpus(a.capacity.gpus, a)
if not refusal then
  refusal = never_fits(a)
  if refusal then refusal[1] = 'never' end
end
if refusal then
  dequeue(e[2], a.kernel_id, 'refused', a.now,
          {'reason', refusal[1], 'field', refusal[2], 'used', refusal[3],
           'limit', refusal[4], 'queued', refusal[5] or '0', 'waited', ts(waited)})
  served(e[5])
  return refusal
end
local pool_held = usage(K.pool_usage)
if check_capacity(a, pool_held) then return {'wait'} end
local devices = take_gpus(a)
create_lease(a, devices, waited, user_held, pool_held)
dequeue(e[2], a.kernel_id, 'admitted', a.now, {'waited', ts(waited)})
served(e[5])
return {'admitted', devices, ts(waited)}
"""
)

# A waiting request leaves the queue. ARGV: 1 the state it ends in (timed_out, left,
# abandoned), 2 now. Replies {'left', position it had} or {'gone', state or ''}.
LEAVE = (
    _PRELUDE
    + """
local e = redis.call('HMGET', K.entry, 'state', 'member', 'kernel_id', 'enqueued')
if e[1] ~= 'waiting' then return {'gone', e[1] or ''} end
local rank = redis.call('ZRANK', K.queue, e[2])
local position = 0
if rank then position = rank + 1 end
local now = tonumber(ARGV[2])
dequeue(e[2], e[3], ARGV[1], now,
        {'position', tostring(position), 'waited', ts(math.max(0, now - tonumber(e[4])))})
return {'left', position}
"""
)

# Release a lease: give back its counters and GPU devices, account its GPU time, keep a
# stopped copy. ARGV: 1 kernel_id, 2 user, 3 pool (as read just before), 4 now, 5 reason,
# 6 seconds to keep stopped leases, 7 GPU-hour window (s). Replies {'released', requests
# waiting in the pool's queue}, {'gone'}, or {'moved'} (owner/pool changed since the caller
# read them: read again and retry). Only the fields it needs are read (not HGETALL).
RELEASE = (
    _PRELUDE
    + """
local f = redis.call('HMGET', K.lease, 'user', 'pool', 'state', 'cpus_milli', 'memory', 'gpus',
                     'gpu_devices', 'created')
if not f[1] then return {'gone'} end
if f[1] ~= ARGV[2] or f[2] ~= ARGV[3] then return {'moved'} end
local lease = {state = f[3], cpus_milli = f[4], memory = f[5], gpus = f[6], gpu_devices = f[7],
               created = f[8]}
local kid, now, keep, window = ARGV[1], tonumber(ARGV[4]), tonumber(ARGV[6]), tonumber(ARGV[7])
redis.call('ZREM', K.leases, kid)
redis.call('SREM', K.user_leases, kid)
redis.call('SREM', K.pool_leases, kid)
local gpus = num(lease.gpus)
local held = {cpus_milli = num(lease.cpus_milli), memory = num(lease.memory), gpus = gpus}
local user_held = usage(K.user_usage)
if user_held.kernels <= 1 then
  redis.call('DEL', K.user_usage)  -- their last kernel
else
  add_usage(K.user_usage, user_held, held, -1)
end
add_usage(K.pool_usage, usage(K.pool_usage), held, -1)
redis.call('HINCRBY', K.pool_states, lease.state or 'starting', -1)
if (lease.gpu_devices or '') ~= '' then
  local devices = num(redis.call('HGET', K.pool_meta, 'gpu_devices'))
  for device in string.gmatch(lease.gpu_devices, '[^,]+') do
    if redis.call('HGET', K.gpus_held, device) == kid then
      redis.call('HDEL', K.gpus_held, device)
      if tonumber(device) < devices then redis.call('SADD', K.gpus_free, device) end
    end
  end
end
if gpus > 0 then
  redis.call('ZREM', K.gpu_running, int(gpus) .. '|' .. kid)
  redis.call('ZADD', K.gpu_done, ts(now), int(gpus) .. '|' .. lease.created .. '|' .. kid)
  redis.call('ZREMRANGEBYSCORE', K.gpu_done, '-inf', '(' .. ts(now - window))
end
redis.call('RENAME', K.lease, K.stopped)  -- replaces an older stopped copy
redis.call('HSET', K.stopped, 'state', 'stopped', 'stopped', ts(now), 'stop_reason', ARGV[5])
redis.call('EXPIRE', K.stopped, keep)
redis.call('ZADD', K.stopped_index, ts(now), kid)
redis.call('ZREMRANGEBYSCORE', K.stopped_index, '-inf', '(' .. ts(now - keep))
return {'released', redis.call('ZCARD', K.queue)}
"""
)

# A user claims a warm kernel: the lease moves from the warm pool's owner to the user, if
# the user's quota allows one more kernel like it. KEYS: the ScriptKeys of (kernel, claiming
# user, pool), then the warm owner's user_leases, user_usage and gpu_running. ARGV[1]: JSON
# {kernel_id, user, kernelspec, warm_user, groups, admin, now, window, quota}. Replies
# {'claimed', field, value, ...} (the lease now), {'gone'} (no such lease), {'taken'} (not
# warm, or another kernelspec), or a 'quota' refusal. Pool usage does not change: the
# kernel already held it.
CLAIM = (
    _PRELUDE
    + """
local W = {user_leases = KEYS[#KEYS - 2], user_usage = KEYS[#KEYS - 1],
           gpu_running = KEYS[#KEYS]}
local a = cjson.decode(ARGV[1])
local fields = redis.call('HGETALL', K.lease)
if #fields == 0 then return {'gone'} end
local lease = {}
for i = 1, #fields, 2 do lease[fields[i]] = fields[i + 1] end
if lease.user ~= a.warm_user or lease.kernelspec ~= a.kernelspec then return {'taken'} end
a.cpus_milli, a.memory, a.gpus = num(lease.cpus_milli), num(lease.memory), num(lease.gpus)
remember_profile(a)
local user_held = usage(K.user_usage)
local refusal = check_quota(a, redis.call('SCARD', K.user_queued), user_held)
if refusal then return refusal end
local kid, now = a.kernel_id, ts(a.now)
redis.call('SREM', W.user_leases, kid)
redis.call('SADD', K.user_leases, kid)
add_usage(W.user_usage, usage(W.user_usage), a, -1)
add_usage(K.user_usage, user_held, a, 1)
if a.gpus > 0 then
  redis.call('ZREM', W.gpu_running, int(a.gpus) .. '|' .. kid)
  redis.call('ZADD', K.gpu_running, now, int(a.gpus) .. '|' .. kid)
end
-- The user's kernel starts now: its lifetime, idle time and GPU-hours count from the claim.
redis.call('HSET', K.lease, 'user', a.user, 'created', now, 'last_activity', now,
           'gpu_seconds_limit', int(a.quota.gpu_seconds), 'warm_since', lease.created,
           'claimed', now)
redis.call('ZADD', K.leases, now, kid)
local claimed = redis.call('HGETALL', K.lease)
table.insert(claimed, 1, 'claimed')
return claimed
"""
)

# Activity of one kernel. ARGV: 1 lease state (starting/idle/busy; '' keeps it), 2 last activity
# (unix s; only moves forward), 3 connections. Replies {'updated', previous state}, {'gone'}.
ACTIVITY = (
    _PRELUDE
    + """
local current = redis.call('HGET', K.lease, 'state')
if not current then return {'gone'} end
if ARGV[1] ~= '' and ARGV[1] ~= current then
  redis.call('HSET', K.lease, 'state', ARGV[1])
  redis.call('HINCRBY', K.pool_states, current, -1)
  redis.call('HINCRBY', K.pool_states, ARGV[1], 1)
end
if tonumber(ARGV[2]) > num(redis.call('HGET', K.lease, 'last_activity')) then
  redis.call('HSET', K.lease, 'last_activity', ts(tonumber(ARGV[2])))
end
redis.call('HSET', K.lease, 'connections', ARGV[3])
return {'updated', current}
"""
)

# GPU-seconds a user held in the window. ARGV: 1 now, 2 window (s). Reply: seconds (text).
GPU_SECONDS = (
    _PRELUDE
    + """
return ts(gpu_seconds(tonumber(ARGV[1]), tonumber(ARGV[2])))
"""
)
