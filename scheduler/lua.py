"""The scheduler's Redis Lua scripts: every decision that touches several keys is one of these.

Each script starts with ``K``, the keys of one kernel by name (bound from ``KEYS`` by
:meth:`scheduler.keys.ScriptKeys.lua_bindings`, so Python and Lua agree on positions), then
the pieces of shared Lua it uses (numbers, usage, quota, pool, queue). Decisions that need
the clock get ``now`` from Python (the scheduler's injectable clock); no script reads
Redis' own time.

Admission arguments are positional (no JSON to decode on every request): ``ARGV[1..3]`` are
``kernel_id``, ``now`` and ``deadline`` (0: do not queue); ``ARGV[4..]`` are
:data:`REQUEST_FIELDS` in that order, the same for every request of a user for a kernelspec
(built once by :func:`scheduler.admission.admission_args`): ``user, kernelspec, pool, cpus``
(text), ``cpus_milli, memory, gpus`` (numbers), ``groups`` (JSON text), ``admin``, ``warm``
('1'/'0'), ``window`` (seconds of the GPU-hour window), the quota's ``kernels, cpus_milli,
memory, gpus, gpu_seconds`` (-1 = unlimited) and the pool's capacity ``cpus_milli, memory,
gpus``. Scripts see them as one flat table ``a`` (``a.quota_gpus``, ``a.capacity_memory``);
a queued request keeps that table as JSON in its entry for PROMOTE.

The hot scripts (ADMIT, RELEASE) are written for Redis' CPU, which bounds how many decisions
a second one Redis makes (bench/README.md): straight-line checks on plain values, no table,
loop or string formatting where a comparison will do, and a lease hash holding only the
fields that differ from their defaults (:meth:`scheduler.leases.Lease.from_redis`).

Counters live in two hashes (see :mod:`scheduler.keys`): a user's ``usage`` (kernels,
cpus_milli, memory, gpus held, and the groups/admin of their last request) and a pool's
``usage`` (the same counters, leases per state, and the device count its free-GPU set was
built for), so a decision reads each with one HMGET and writes it with one HSET.

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

#: ADMIT's ``ARGV[4..]``, in order: (name in the table ``a``, kind). Kinds: ``s`` text,
#: ``n`` number, ``t`` number also kept as sent (``a.<name>_text``, written to the lease as
#: it is), ``b`` flag ('1' or '0').
REQUEST_FIELDS: tuple[tuple[str, str], ...] = (
    ("user", "s"), ("kernelspec", "s"), ("pool", "s"), ("cpus", "s"), ("cpus_milli", "t"),
    ("memory", "t"), ("gpus", "t"), ("groups", "s"), ("admin", "b"), ("warm", "b"),
    ("window", "n"), ("quota_kernels", "n"), ("quota_cpus_milli", "n"), ("quota_memory", "n"),
    ("quota_gpus", "n"), ("quota_gpu_seconds", "t"), ("capacity_cpus_milli", "n"),
    ("capacity_memory", "n"), ("capacity_gpus", "n"),
)  # fmt: skip
#: ADMIT's ``ARGV[1..3]`` (kernel_id, now, deadline) differ from one request to the next.
REQUEST_OFFSET = 3


def _request_table() -> str:
    """Lua: ``request(v)``, ADMIT's ARGV as the table ``a`` (see REQUEST_FIELDS)."""
    convert = {"s": "{n} = v[{i}]", "n": "{n} = v[{i}] + 0", "b": "{n} = v[{i}] == '1'",
               "t": "{n} = v[{i}] + 0, {n}_text = v[{i}]"}  # fmt: skip
    fields = [
        convert[kind].format(n=name, i=i)
        for i, (name, kind) in enumerate(REQUEST_FIELDS, start=REQUEST_OFFSET + 1)
    ]
    return (
        "local function request(v)\n"
        "  return {kernel_id = v[1], now = v[2] + 0, deadline = v[3] + 0,\n    "
        + ",\n    ".join(fields)
        + "}\nend\n"
    )


# Shared Lua, one piece per concern: a script includes only the pieces it uses (each piece
# is run again on every call), in this order (later pieces call earlier ones).
_NUMBERS = """
-- `v + 0`, not tonumber(v): Lua 5.1's tonumber parses a string twice (a tenth of a
-- decision's work in Redis was number parsing). Stored counters are numbers or absent.
local function num(v) if v then return v + 0 end return 0 end
-- '%d' and '%.3f': Redis rejects '-0' and exponent notation as integers. int() takes
-- whole numbers (the counters are sums of them; a fraction, e.g. GPU-seconds in a message,
-- is cut off).
local function int(v) return string.format('%d', v) end
local function ts(v) return string.format('%.3f', v) end
"""

# GPU-seconds the user held in (now - window, now]: ended leases, then running ones.
_GPU_SECONDS = """
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
"""

# A usage hash's counters are its fields 1-4 (read with HMGET ... unpack(USAGE), extra fields
# after them, then made numbers once by counts()); add_usage writes them back with one kernel
# more or less, in one HSET.
_USAGE = """
local USAGE = {'kernels', 'cpus_milli', 'memory', 'gpus'}
local function counts(v)
  for i = 1, 4 do v[i] = num(v[i]) end
  return v
end

-- (Numbers go to Redis as int() text: a Lua number would be printed as '%.17g', several
-- times the work.)
local function add_usage(key, v, sign, cpus_milli, memory, gpus, ...)
  redis.call('HSET', key, 'kernels', int(v[1] + sign), 'cpus_milli', int(v[2] + sign * cpus_milli),
             'memory', int(v[3] + sign * memory), 'gpus', int(v[4] + sign * gpus), ...)
end
"""

# Quota checks and the user's profile (groups, admin as of their request), which is written
# with their usage. `held`: the user's usage hash read with USAGE, 'groups', 'admin'.
_QUOTA = """
local function profile_changed(a, held)
  return held[5] ~= a.groups or held[6] ~= (a.admin and '1' or '0')
end

local function save_profile(a)
  redis.call('HSET', K.user_usage, 'groups', a.groups, 'admin', a.admin and '1' or '0')
end

-- The refusal when `used` plus `queued` plus `need` goes over `limit` (-1: none), else nil.
local function over(field, used, need, limit, queued)
  if limit >= 0 and need > 0 and used + queued + need > limit then
    return {'quota', field, int(used), int(limit), int(queued)}
  end
  return nil
end

-- nil when the user, holding `held` and with `queued` requests waiting, may hold one more
-- kernel like `a`, else the refusal (checked in this order).
local function check_quota(a, queued, held)
  local refusal = over('kernels', held[1], 1, a.quota_kernels, queued)
    or over('gpus', held[4], a.gpus, a.quota_gpus, 0)
    or over('cpus_milli', held[2], a.cpus_milli, a.quota_cpus_milli, 0)
    or over('memory', held[3], a.memory, a.quota_memory, 0)
  if refusal then return refusal end
  if a.gpus > 0 and a.quota_gpu_seconds >= 0 then
    local used = gpu_seconds(a.now, a.window)
    if used >= a.quota_gpu_seconds then
      return {'quota', 'gpu_seconds', int(used), int(a.quota_gpu_seconds), '0'}
    end
  end
  return nil
end

-- A request stored before the table was flat (quota and capacity as sub-tables) or from
-- CLAIM's JSON: flat.
local function flat(a)
  for _, part in ipairs({'quota', 'capacity'}) do
    if type(a[part]) == 'table' then
      for field, value in pairs(a[part]) do a[part .. '_' .. field] = value end
      a[part] = nil
    end
  end
  return a
end
"""

# Pool capacity and GPU devices. `pool_held`: the pool's usage hash read with USAGE,
# 'starting', 'gpu_devices' (the lease count per state lives in it: starting, idle, busy).
_POOL = """
-- Rebuild the free-device set on first use, after Redis lost its data, or when the
-- pool's device count changed. Requests without GPUs in a pool without GPUs never read
-- the set: nothing to do.
local function sync_gpus(a, pool_held)
  local devices = a.capacity_gpus
  if devices == 0 and a.gpus == 0 then return end
  if tonumber(pool_held[6] or '-1') ~= devices then
    redis.call('DEL', K.gpus_free)
    for d = 0, devices - 1 do
      if redis.call('HEXISTS', K.gpus_held, tostring(d)) == 0 then
        redis.call('SADD', K.gpus_free, tostring(d))
      end
    end
    redis.call('HSET', K.pool_usage, 'gpu_devices', devices)
  end
end

-- nil unless `a` needs more than the whole pool has.
local function never_fits(a)
  if a.gpus > a.capacity_gpus then
    return {'pool', 'gpus', int(redis.call('SCARD', K.gpus_free)), int(a.capacity_gpus)}
  end
  if a.cpus_milli > a.capacity_cpus_milli then
    return {'never', 'cpus_milli', int(a.cpus_milli), int(a.capacity_cpus_milli)}
  end
  if a.memory > a.capacity_memory then
    return {'never', 'memory', int(a.memory), int(a.capacity_memory)}
  end
  return nil
end

-- nil when the pool, holding `held`, has room for `a` now, else the 'pool' reply.
local function check_capacity(a, held)
  local used = held[2]
  if a.cpus_milli > 0 and used + a.cpus_milli > a.capacity_cpus_milli then
    return {'pool', 'cpus_milli', int(used), int(a.capacity_cpus_milli)}
  end
  used = held[3]
  if a.memory > 0 and used + a.memory > a.capacity_memory then
    return {'pool', 'memory', int(used), int(a.capacity_memory)}
  end
  if a.gpus > 0 then
    local free = redis.call('SCARD', K.gpus_free)
    if free < a.gpus then return {'pool', 'gpus', int(free), int(a.capacity_gpus)} end
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

-- The lease (fields at their default are not written: no GPU devices, waited 0, last
-- activity = created, 0 connections), its indexes, and the user's and pool's usage
-- (`user_held`, `pool_held`: as read by the checks just before). `now`: a.now as text;
-- `changed`: write the user's profile too.
local function create_lease(a, devices, waited, user_held, pool_held, now, changed)
  local kid = a.kernel_id
  redis.call('HSET', K.lease, 'kernel_id', kid, 'user', a.user, 'kernelspec', a.kernelspec,
             'pool', a.pool, 'cpus', a.cpus, 'cpus_milli', a.cpus_milli_text or int(a.cpus_milli),
             'memory', a.memory_text or int(a.memory), 'gpus', a.gpus_text or int(a.gpus),
             'state', 'starting', 'created', now,
             'gpu_seconds_limit', a.quota_gpu_seconds_text or int(a.quota_gpu_seconds))
  if devices ~= '' then redis.call('HSET', K.lease, 'gpu_devices', devices) end
  if waited > 0 then redis.call('HSET', K.lease, 'waited', ts(waited)) end
  -- whole seconds: the index is read by time windows, and whole numbers keep a small
  -- sorted set's inserts from parsing every score in it
  redis.call('ZADD', K.leases, int(math.floor(a.now)), kid)
  redis.call('SADD', K.user_leases, kid)
  redis.call('SADD', K.pool_leases, kid)
  if changed then
    add_usage(K.user_usage, user_held, 1, a.cpus_milli, a.memory, a.gpus,
              'groups', a.groups, 'admin', a.admin and '1' or '0')
  else
    add_usage(K.user_usage, user_held, 1, a.cpus_milli, a.memory, a.gpus)
  end
  add_usage(K.pool_usage, pool_held, 1, a.cpus_milli, a.memory, a.gpus,
            'starting', int(num(pool_held[5]) + 1))
  if a.gpus > 0 then
    redis.call('ZADD', K.gpu_running, now, int(a.gpus) .. '|' .. kid)
  end
end
"""

_QUEUE = """
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
             'args', cjson.encode(a))
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

# The decision pieces, for the scripts that admit.
_DECIDE = _NUMBERS + _GPU_SECONDS + _USAGE + _QUOTA + _POOL + _QUEUE


def _script(*pieces: str) -> str:
    """A script: the key names (``K``), then ``pieces``."""
    return ScriptKeys.lua_bindings() + "".join(pieces)


# A new request: the same kernel id again is idempotent (its lease, or its queue place).
ADMIT = _script(
    _DECIDE,
    _request_table(),
    """
local a = request(ARGV)
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

local user_held = counts(redis.call('HMGET', K.user_usage, 'kernels', 'cpus_milli', 'memory',
                                    'gpus', 'groups', 'admin'))
-- warm kernels belong to nobody yet: no profile, not a user
local changed = not a.warm and profile_changed(a, user_held)
local refusal = check_quota(a, redis.call('SCARD', K.user_queued), user_held)
if not refusal then
  local pool_held = counts(redis.call('HMGET', K.pool_usage, 'kernels', 'cpus_milli', 'memory',
                                      'gpus', 'starting', 'gpu_devices'))
  sync_gpus(a, pool_held)
  refusal = never_fits(a)
  if not refusal then
    local waiting = redis.call('ZCARD', K.queue)
    if waiting > 0 then
      refusal = {'pool', 'queue', int(waiting), '0'}  -- no jumping the queue
    else
      refusal = check_capacity(a, pool_held)
    end
    if not refusal then
      local devices = take_gpus(a)
      create_lease(a, devices, 0, user_held, pool_held, ARGV[2], changed)
      return {'admitted', devices}
    end
    if a.deadline > a.now then refusal = {'queued', enqueue(a)} end
  end
end
if changed then save_profile(a) end
return refusal
""",
)

# The head of a pool's queue, if it is still ARGV[1] (its member): admit it when it fits,
# refuse it when its quota no longer allows it, else leave it waiting.
# ARGV[2]: JSON {now, capacity}. Replies: {'admitted', devices, waited}, {'wait'},
# {'stale'} / {'not_head'} (read the head again), or a 'quota'/'never' refusal.
PROMOTE = _script(
    _DECIDE,
    """
local head = redis.call('ZRANGE', K.queue, 0, 0)
if head[1] ~= ARGV[1] then return {'not_head'} end
local e = redis.call('HMGET', K.entry, 'state', 'member', 'args', 'enqueued', 'tag',
                     'kernel_id')
if e[1] ~= 'waiting' or e[2] ~= ARGV[1] then
  redis.call('ZREM', K.queue, ARGV[1])  -- a place without a waiting request: drop it
  return {'stale'}
end
local a = flat(cjson.decode(e[3]))
a.kernel_id = e[6]
local now_and_capacity = cjson.decode(ARGV[2])
a.now = now_and_capacity.now
a.capacity = now_and_capacity.capacity
a = flat(a)
local waited = math.max(0, a.now - tonumber(e[4]))
if redis.call('EXISTS', K.lease) == 1 then
  dequeue(e[2], a.kernel_id, 'admitted', a.now, {'waited', ts(waited)})
  return {'admitted', redis.call('HGET', K.lease, 'gpu_devices') or '', ts(waited)}
end
-- this request is among the user's waiting ones: it does not count against itself
local user_held = counts(redis.call('HMGET', K.user_usage, unpack(USAGE)))
local refusal = check_quota(a, redis.call('SCARD', K.user_queued) - 1, user_held)
local pool_held = counts(redis.call('HMGET', K.pool_usage, 'kernels', 'cpus_milli', 'memory',
                                    'gpus', 'starting', 'gpu_devices'))
sync_gpus(a, pool_held)
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
if check_capacity(a, pool_held) then return {'wait'} end
local devices = take_gpus(a)
create_lease(a, devices, waited, user_held, pool_held, ts(a.now), false)
dequeue(e[2], a.kernel_id, 'admitted', a.now, {'waited', ts(waited)})
served(e[5])
return {'admitted', devices, ts(waited)}
""",
)

# A waiting request leaves the queue. ARGV: 1 the state it ends in (timed_out, left,
# abandoned), 2 now. Replies {'left', position it had} or {'gone', state or ''}.
LEAVE = _script(
    _NUMBERS,
    _QUEUE,
    """
local e = redis.call('HMGET', K.entry, 'state', 'member', 'kernel_id', 'enqueued')
if e[1] ~= 'waiting' then return {'gone', e[1] or ''} end
local rank = redis.call('ZRANK', K.queue, e[2])
local position = 0
if rank then position = rank + 1 end
local now = tonumber(ARGV[2])
dequeue(e[2], e[3], ARGV[1], now,
        {'position', tostring(position), 'waited', ts(math.max(0, now - tonumber(e[4])))})
return {'left', position}
""",
)

# Release a lease: give back its counters and GPU devices, account its GPU time, keep a
# stopped copy (listed and trimmed by :meth:`scheduler.leases.LeaseStore.trim_stopped`).
# ARGV: 1 kernel_id, 2 user, 3 pool (as read just before), 4 now, 5 reason, 6 GPU-hour
# window (s). Replies {'released', requests waiting in the pool's queue}, {'gone'}, or
# {'moved'} (owner/pool changed since the caller read them: read again and retry). Only the
# fields it needs are read (not HGETALL).
RELEASE = _script(
    _NUMBERS,
    _USAGE,
    """
local f = redis.call('HMGET', K.lease, 'user', 'pool', 'state', 'cpus_milli', 'memory', 'gpus',
                     'gpu_devices', 'created')
if not f[1] then return {'gone'} end
if f[1] ~= ARGV[2] or f[2] ~= ARGV[3] then return {'moved'} end
local kid, now, state = ARGV[1], ARGV[4], f[3] or 'starting'
local cpus_milli, memory, gpus = num(f[4]), num(f[5]), num(f[6])
redis.call('ZREM', K.leases, kid)
redis.call('SREM', K.user_leases, kid)
redis.call('SREM', K.pool_leases, kid)
add_usage(K.user_usage, counts(redis.call('HMGET', K.user_usage, unpack(USAGE))), -1,
          cpus_milli, memory, gpus)
local pool_held = counts(redis.call('HMGET', K.pool_usage, 'kernels', 'cpus_milli', 'memory',
                                    'gpus', state, 'gpu_devices'))
add_usage(K.pool_usage, pool_held, -1, cpus_milli, memory, gpus, state,
          int(num(pool_held[5]) - 1))
if f[7] then  -- its GPU devices go back to the free set (unless the pool has fewer now)
  local count = num(pool_held[6])
  for device in string.gmatch(f[7], '[^,]+') do
    if redis.call('HGET', K.gpus_held, device) == kid then
      redis.call('HDEL', K.gpus_held, device)
      if tonumber(device) < count then redis.call('SADD', K.gpus_free, device) end
    end
  end
end
if gpus > 0 then
  redis.call('ZREM', K.gpu_running, f[6] .. '|' .. kid)
  redis.call('ZADD', K.gpu_done, now, f[6] .. '|' .. f[8] .. '|' .. kid)
  redis.call('ZREMRANGEBYSCORE', K.gpu_done, '-inf', '(' .. ts(tonumber(now) - ARGV[6]))
end
redis.call('RENAME', K.lease, K.stopped)  -- replaces an older stopped copy
redis.call('HSET', K.stopped, 'state', 'stopped', 'stopped', now, 'stop_reason', ARGV[5])
redis.call('ZADD', K.stopped_index, now, kid)
return {'released', redis.call('ZCARD', K.queue)}
""",
)

# Stopped copies older than ARGV[1] (unix s) go, with their index entries. KEYS: the stopped
# index, then the stopped copies of the kernel ids in ARGV[2..] (read from the index just
# before: one that was stopped again meanwhile is newer and stays). Reply: how many went.
TRIM_STOPPED = """
local cutoff, trimmed = tonumber(ARGV[1]), 0
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) < cutoff then
    redis.call('DEL', KEYS[i])
    redis.call('ZREM', KEYS[1], ARGV[i])
    trimmed = trimmed + 1
  end
end
return trimmed
"""

# A user claims a warm kernel: the lease moves from the warm pool's owner to the user, if
# the user's quota allows one more kernel like it. KEYS: the ScriptKeys of (kernel, claiming
# user, pool), then the warm owner's user_leases, user_usage and gpu_running. ARGV[1]: JSON
# {kernel_id, user, kernelspec, warm_user, groups, admin, now, window, quota}. Replies
# {'claimed', field, value, ...} (the lease now), {'gone'} (no such lease), {'taken'} (not
# warm, or another kernelspec), or a 'quota' refusal. Pool usage does not change: the
# kernel already held it.
CLAIM = _script(
    _NUMBERS,
    _GPU_SECONDS,
    _USAGE,
    _QUOTA,
    """
local W = {user_leases = KEYS[#KEYS - 2], user_usage = KEYS[#KEYS - 1],
           gpu_running = KEYS[#KEYS]}
local a = flat(cjson.decode(ARGV[1]))
local fields = redis.call('HGETALL', K.lease)
if #fields == 0 then return {'gone'} end
local lease = {}
for i = 1, #fields, 2 do lease[fields[i]] = fields[i + 1] end
if lease.user ~= a.warm_user or lease.kernelspec ~= a.kernelspec then return {'taken'} end
a.cpus_milli, a.memory, a.gpus = num(lease.cpus_milli), num(lease.memory), num(lease.gpus)
local user_held = counts(redis.call('HMGET', K.user_usage, 'kernels', 'cpus_milli', 'memory',
                                    'gpus', 'groups', 'admin'))
local changed = profile_changed(a, user_held)
local refusal = check_quota(a, redis.call('SCARD', K.user_queued), user_held)
if refusal then
  if changed then save_profile(a) end
  return refusal
end
local kid, now = a.kernel_id, ts(a.now)
redis.call('SREM', W.user_leases, kid)
redis.call('SADD', K.user_leases, kid)
add_usage(W.user_usage, counts(redis.call('HMGET', W.user_usage, unpack(USAGE))), -1,
          a.cpus_milli, a.memory, a.gpus)
if changed then
  add_usage(K.user_usage, user_held, 1, a.cpus_milli, a.memory, a.gpus,
            'groups', a.groups, 'admin', a.admin and '1' or '0')
else
  add_usage(K.user_usage, user_held, 1, a.cpus_milli, a.memory, a.gpus)
end
if a.gpus > 0 then
  redis.call('ZREM', W.gpu_running, int(a.gpus) .. '|' .. kid)
  redis.call('ZADD', K.gpu_running, now, int(a.gpus) .. '|' .. kid)
end
-- The user's kernel starts now: its lifetime, idle time and GPU-hours count from the claim.
redis.call('HSET', K.lease, 'user', a.user, 'created', now, 'last_activity', now,
           'gpu_seconds_limit', int(a.quota_gpu_seconds), 'warm_since', lease.created,
           'claimed', now)
redis.call('ZADD', K.leases, int(math.floor(a.now)), kid)
local claimed = redis.call('HGETALL', K.lease)
table.insert(claimed, 1, 'claimed')
return claimed
""",
)

# Activity of one kernel. ARGV: 1 lease state (starting/idle/busy; '' keeps it), 2 last activity
# (unix s; only moves forward from the lease's creation), 3 connections. Replies
# {'updated', previous state}, {'gone'}.
ACTIVITY = _script(
    _NUMBERS,
    """
local lease = redis.call('HMGET', K.lease, 'state', 'last_activity', 'created')
local current = lease[1]
if not current then return {'gone'} end
if ARGV[1] ~= '' and ARGV[1] ~= current then
  redis.call('HSET', K.lease, 'state', ARGV[1])
  redis.call('HINCRBY', K.pool_usage, current, -1)
  redis.call('HINCRBY', K.pool_usage, ARGV[1], 1)
end
if tonumber(ARGV[2]) > num(lease[2] or lease[3]) then
  redis.call('HSET', K.lease, 'last_activity', ts(tonumber(ARGV[2])))
end
redis.call('HSET', K.lease, 'connections', ARGV[3])
return {'updated', current}
""",
)

# GPU-seconds a user held in the window. ARGV: 1 now, 2 window (s). Reply: seconds (text).
GPU_SECONDS = _script(
    _NUMBERS,
    _GPU_SECONDS,
    """
return ts(gpu_seconds(tonumber(ARGV[1]), tonumber(ARGV[2])))
""",
)
