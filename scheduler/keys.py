"""Every Redis key the scheduler uses, and nothing else.

All scheduler state lives in Redis under the ``kf:`` prefix. Names that come from users
(user names, kernel ids) are percent-encoded, so a user called ``a:b`` can never collide
with another key. Lua scripts get every key they touch from these functions, through
``KEYS`` (never built inside a script), so the layout can be read here in one place:

==========================================  ======  ============================================
key                                         type    content
==========================================  ======  ============================================
``kf:lease:{kernel_id}``                    hash    one lease (see :mod:`scheduler.leases`)
``kf:leases``                               zset    kernel_id scored by created time (whole unix s)
``kf:stopped:{kernel_id}``                  hash    a stopped lease, kept a while (trimmed by index)
``kf:leases:stopped``                       zset    kernel_id of stopped leases by stop time
``kf:user:{user}:leases``                   set     kernel_ids of a user's leases
``kf:user:{user}:usage``                    hash    kernels, cpus_milli, memory, gpus held by user;
                                                    groups (JSON), admin: as of their last request
``kf:user:{user}:gpu:running``              zset    ``gpus|kernel_id`` by start time
``kf:user:{user}:gpu:done``                 zset    ``gpus|start|kernel_id`` by end time (24 h)
``kf:user:{user}:queued``                   set     kernel_ids of a user's waiting requests
``kf:pool:{pool}:leases``                   set     kernel_ids of the leases in a pool
``kf:pool:{pool}:usage``                    hash    kernels, cpus_milli, memory, gpus used in pool;
                                                    starting, idle, busy: leases in that state;
                                                    gpu_devices: device count the free set is for
``kf:pool:{pool}:gpus:free``                set     free GPU device indexes of the pool
``kf:pool:{pool}:gpus:held``                hash    GPU device index -> kernel_id holding it
``kf:pool:{pool}:queue``                    zset    ``seq|kernel_id`` by fair-queue tag
``kf:pool:{pool}:queue:user:{user}``        zset    kernel_id by tag: one user's waiting requests
``kf:pool:{pool}:queue:meta``               hash    vtime (tag last served), seq (arrivals)
``kf:queued:{kernel_id}``                   hash    one queue entry and, for a while, its outcome
``kf:queue:deadlines``                      zset    waiting kernel_id by deadline (unix s)
``kf:queue:seen``                           zset    waiting kernel_id by its client's last poll
``kf:reconcile:missing``                    zset    leased kernel_id EG does not run, by first seen
``kf:reconcile:orphans``                    zset    kernel_id EG runs unleased, by first seen
``kf:evict:warned``                         hash    kernel_id -> JSON of the eviction warning sent
``kf:evict:notes``                          hash    user -> JSON note for their next kernel start
``kf:warm:targets``                          hash    kernelspec -> warm target pinned by ops
``kf:evictions``                            list    JSON eviction records, newest first (capped)
``kf:lock:{name}``                          string  holder of a loop's lock (with expiry)
``kf:start-failure:{kernel_id}``            hash    why a kernel pod did not start (kubernetes; TTL)
``kf:schema``                               string  the layout's version (:data:`SCHEMA`)
==========================================  ======  ============================================

The layout has a version, :data:`SCHEMA` in ``kf:schema``; :mod:`scheduler.migrate` brings
older data up to it when the scheduler starts (the keys of older layouts are named there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from functools import lru_cache
from urllib.parse import quote

PREFIX = "kf"
LEASES = f"{PREFIX}:leases"
STOPPED = f"{PREFIX}:leases:stopped"
QUEUE_DEADLINES = f"{PREFIX}:queue:deadlines"
QUEUE_SEEN = f"{PREFIX}:queue:seen"
RECONCILE_MISSING = f"{PREFIX}:reconcile:missing"
RECONCILE_ORPHANS = f"{PREFIX}:reconcile:orphans"
EVICT_WARNED = f"{PREFIX}:evict:warned"
EVICT_NOTES = f"{PREFIX}:evict:notes"
EVICTIONS = f"{PREFIX}:evictions"
WARM_TARGETS = f"{PREFIX}:warm:targets"
SCHEMA_KEY = f"{PREFIX}:schema"
#: The layout described above. 2: usage hashes hold lease states, device counts and
#: profiles; stopped copies are trimmed by their index, not by TTL.
SCHEMA = 2


#: The names ``quote(name, safe="")`` leaves as they are (letters, digits, ``_.-~``).
_PLAIN = re.compile(r"[A-Za-z0-9_.~-]*").fullmatch


def _part(name: str) -> str:
    """Encode a user-supplied name so it cannot break out of its key segment."""
    return name if _PLAIN(name) else _quoted(name)


@lru_cache(maxsize=65536)
def _quoted(name: str) -> str:
    """Cached: every admission and release of a user like ``a@b`` encodes it again."""
    return quote(name, safe="")


def lease(kernel_id: str) -> str:
    """The hash of one lease."""
    return f"{PREFIX}:lease:{_part(kernel_id)}"


def stopped(kernel_id: str) -> str:
    """The hash of a stopped lease (expires)."""
    return f"{PREFIX}:stopped:{_part(kernel_id)}"


def user_leases(user: str) -> str:
    """The set of a user's kernel ids."""
    return f"{PREFIX}:user:{_part(user)}:leases"


def user_usage(user: str) -> str:
    """The hash of what a user holds across all pools."""
    return f"{PREFIX}:user:{_part(user)}:usage"


def user_gpu_running(user: str) -> str:
    """The zset of a user's running GPU leases (``gpus|kernel_id`` by start time)."""
    return f"{PREFIX}:user:{_part(user)}:gpu:running"


def user_gpu_done(user: str) -> str:
    """The zset of a user's GPU leases that ended in the last day (by end time)."""
    return f"{PREFIX}:user:{_part(user)}:gpu:done"


def user_queued(user: str) -> str:
    """The set of a user's waiting kernel ids, all pools."""
    return f"{PREFIX}:user:{_part(user)}:queued"


def pool_leases(pool: str) -> str:
    """The set of kernel ids in a pool."""
    return f"{PREFIX}:pool:{_part(pool)}:leases"


def pool_usage(pool: str) -> str:
    """The hash of what is used in a pool."""
    return f"{PREFIX}:pool:{_part(pool)}:usage"


def pool_gpus_free(pool: str) -> str:
    """The set of free GPU device indexes in a pool."""
    return f"{PREFIX}:pool:{_part(pool)}:gpus:free"


def pool_gpus_held(pool: str) -> str:
    """The hash of GPU device index -> kernel id holding it."""
    return f"{PREFIX}:pool:{_part(pool)}:gpus:held"


def pool_queue(pool: str) -> str:
    """The zset of a pool's waiting requests, in service order."""
    return f"{PREFIX}:pool:{_part(pool)}:queue"


def pool_queue_user(pool: str, user: str) -> str:
    """The zset of one user's waiting requests in a pool (by tag)."""
    return f"{PREFIX}:pool:{_part(pool)}:queue:user:{_part(user)}"


def pool_queue_meta(pool: str) -> str:
    """The hash of a pool queue's virtual time and arrival counter."""
    return f"{PREFIX}:pool:{_part(pool)}:queue:meta"


def queued(kernel_id: str) -> str:
    """The hash of one queue entry."""
    return f"{PREFIX}:queued:{_part(kernel_id)}"


def start_failure(kernel_id: str) -> str:
    """The hash of why a kernel's pod did not start (see :mod:`scheduler.kubernetes`)."""
    return f"{PREFIX}:start-failure:{_part(kernel_id)}"


def lock(name: str) -> str:
    """A loop's lock."""
    return f"{PREFIX}:lock:{_part(name)}"


@dataclass(frozen=True)
class ScriptKeys:
    """Every key a script may touch for one kernel of ``user`` in ``pool``, in ``KEYS`` order.

    All scripts take these same keys (see :mod:`scheduler.lua`), which bind them to names
    with :func:`lua_bindings`, so Python and Lua cannot disagree on positions.
    """

    leases: str
    user_leases: str
    user_usage: str
    pool_leases: str
    pool_usage: str
    gpus_free: str
    gpus_held: str
    gpu_running: str
    gpu_done: str
    queue: str
    queue_user: str
    queue_meta: str
    user_queued: str
    deadlines: str
    seen: str
    stopped_index: str
    # the kernel's own keys come last (see list_for)
    lease: str
    entry: str
    stopped: str

    @classmethod
    def for_kernel(cls, kernel_id: str, *, user: str, pool: str) -> ScriptKeys:
        """The keys of ``kernel_id`` owned by ``user`` in ``pool``."""
        return cls(
            lease=lease(kernel_id),
            leases=LEASES,
            user_leases=user_leases(user),
            user_usage=user_usage(user),
            pool_leases=pool_leases(pool),
            pool_usage=pool_usage(pool),
            gpus_free=pool_gpus_free(pool),
            gpus_held=pool_gpus_held(pool),
            gpu_running=user_gpu_running(user),
            gpu_done=user_gpu_done(user),
            queue=pool_queue(pool),
            queue_user=pool_queue_user(pool, user),
            queue_meta=pool_queue_meta(pool),
            entry=queued(kernel_id),
            user_queued=user_queued(user),
            deadlines=QUEUE_DEADLINES,
            seen=QUEUE_SEEN,
            stopped=stopped(kernel_id),
            stopped_index=STOPPED,
        )

    def as_list(self) -> list[str]:
        """The keys in ``KEYS`` order."""
        return [getattr(self, name) for name in _SCRIPT_KEY_NAMES]

    @staticmethod
    def list_for(kernel_id: str, *, user: str, pool: str) -> list[str]:
        """``for_kernel(...).as_list()``, for the hot path: :meth:`owner_part` then
        :meth:`kernel_part`."""
        return [*_owner_keys(user, pool), *ScriptKeys.kernel_part(kernel_id)]

    @staticmethod
    def owner_part(user: str, pool: str) -> tuple[str, ...]:
        """The first ``KEYS``: those of ``user`` and ``pool``, the same for all their kernels
        (built once per owner, and packed once per owner by :mod:`scheduler.batching`)."""
        return _owner_keys(user, pool)

    @staticmethod
    def kernel_part(kernel_id: str) -> tuple[str, str, str]:
        """The last three ``KEYS``: the kernel's own lease, queue entry and stopped copy
        (``lease``, ``queued`` and ``stopped`` of it, the id encoded once)."""
        part = _part(kernel_id)
        return f"{PREFIX}:lease:{part}", f"{PREFIX}:queued:{part}", f"{PREFIX}:stopped:{part}"

    @classmethod
    def lua_bindings(cls) -> str:
        """Lua that names the keys: ``local K = {lease = KEYS[1], ...}``."""
        pairs = ", ".join(f"{f.name} = KEYS[{i}]" for i, f in enumerate(fields(cls), start=1))
        return f"local K = {{{pairs}}}\n"


_SCRIPT_KEY_NAMES = tuple(f.name for f in fields(ScriptKeys))
_KERNEL_PART = ("lease", "entry", "stopped")  # kernel_part's order
assert _SCRIPT_KEY_NAMES[-3:] == _KERNEL_PART, "the kernel's own keys must come last"


@lru_cache(maxsize=16384)
def _owner_keys(user: str, pool: str) -> tuple[str, ...]:
    """The script keys of ``user`` in ``pool``: all but the kernel's own."""
    return tuple(ScriptKeys.for_kernel("-", user=user, pool=pool).as_list()[:-3])
