"""Bring Redis data written by an older scheduler up to the current layout (:data:`keys.SCHEMA`).

Layout 1 (up to November 2026) kept three small hashes that the hot scripts now read and
write together with the usage counters, one HMGET and one HSET instead of three calls:

- ``kf:pool:{pool}:states`` (lease state -> count): into ``kf:pool:{pool}:usage`` as the
  fields starting, idle and busy;
- ``kf:pool:{pool}:meta`` (gpu_devices): into ``kf:pool:{pool}:usage``;
- ``kf:user:{user}:profile`` (groups, admin): into ``kf:user:{user}:usage``.

Each old hash is merged and deleted in one script, so running the migration twice, or
stopping it halfway and running it again, changes nothing more. The old keys are found
with SCAN, once, when the scheduler starts (``kf:schema`` says whether it is needed).
Stopped leases of layout 1 still expire by TTL; their index entries are trimmed as usual.

The scheduler's Deployment is ``Recreate``: no scheduler of the old layout writes while this
runs.
"""

from __future__ import annotations

import logging

from redis.asyncio import Redis

from . import keys

log = logging.getLogger(__name__)

#: Old hash suffix -> (the usage hash suffix it goes into, the fields to move; None: all).
_MERGES: dict[str, tuple[str, tuple[str, ...] | None]] = {
    ":states": (":usage", None),
    ":meta": (":usage", ("gpu_devices",)),
    ":profile": (":usage", ("groups", "admin")),
}
_PATTERNS = (f"{keys.PREFIX}:pool:*:states", f"{keys.PREFIX}:pool:*:meta",
             f"{keys.PREFIX}:user:*:profile")  # fmt: skip

# KEYS: 1 the old hash, 2 the usage hash. ARGV[1]: 'add' (counts: added to what the usage
# hash has) or 'set' (values: written as they are); ARGV[2..]: the fields to move (none: all).
# Deletes the old hash. Reply: how many fields moved.
_MERGE = """
local fields = {}
if #ARGV > 1 then
  local values = redis.call('HMGET', KEYS[1], unpack(ARGV, 2))
  for i = 2, #ARGV do
    if values[i - 1] then table.insert(fields, ARGV[i]) table.insert(fields, values[i - 1]) end
  end
else
  fields = redis.call('HGETALL', KEYS[1])
end
for i = 1, #fields, 2 do
  if ARGV[1] == 'add' then
    redis.call('HINCRBY', KEYS[2], fields[i], fields[i + 1])
  else
    redis.call('HSET', KEYS[2], fields[i], fields[i + 1])
  end
end
redis.call('DEL', KEYS[1])
return #fields / 2
"""


async def migrate(redis: Redis) -> int:
    """Bring ``redis`` up to :data:`keys.SCHEMA`; how many old hashes were merged (0 when it
    was up to date)."""
    if await redis.get(keys.SCHEMA_KEY) == str(keys.SCHEMA):
        return 0
    merge = redis.register_script(_MERGE)
    merged = 0
    for pattern in _PATTERNS:
        async for old in redis.scan_iter(match=pattern, count=1000):
            if old.count(":") != 3:  # e.g. kf:pool:cpu:queue:meta: names are encoded, so
                continue  # a pool's or user's own segment holds no ':'
            suffix = next(s for s in _MERGES if old.endswith(s))
            into, fields = _MERGES[suffix]
            how = "add" if suffix == ":states" else "set"
            target = old[: -len(suffix)] + into
            await merge(keys=[old, target], args=[how, *(fields or ())])
            merged += 1
    await redis.set(keys.SCHEMA_KEY, str(keys.SCHEMA))
    if merged:
        log.info("Redis data brought up to layout %s: %s old hashes merged", keys.SCHEMA, merged)
    return merged
