"""How kernelfleet's Redis is configured for the scheduler's workload, in one place.

``kernelfleet up`` starts Redis with :data:`TUNING`, so do the Redis servers of the tests and
of bench/ (``tests.support.redis_server``), and ``deploy/base/redis.yaml`` spells the same
arguments out (a test checks they agree). A Redis run elsewhere (a managed service) works
without them, a little slower.

- ``zset-max-ziplist-entries 16`` (``zset-max-listpack-entries`` since Redis 7, which keeps
  the old name): a sorted set of more than 16 members is kept as a skip list instead of one
  packed list. ``kf:leases`` gains and loses a member on every admission and release; as a
  packed list of a few dozen members each change walked all of them, about 5% of Redis' work
  per admission (bench/README.md). Small sets - a user's GPU leases, an idle queue - stay
  packed.
"""

from __future__ import annotations

#: redis-server command-line arguments.
TUNING: tuple[str, ...] = ("--zset-max-ziplist-entries", "16")
