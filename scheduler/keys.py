"""Every Redis key the scheduler uses, and nothing else.

All scheduler state lives in Redis under the ``kf:`` prefix. Names that come from users
(user names, kernel ids) are percent-encoded, so a user called ``a:b`` can never collide
with another key. Lua scripts get every key they touch from these functions, through
``KEYS`` (never built inside a script), so the layout can be read here in one place:

========================================  ======  ==============================================
key                                       type    content
========================================  ======  ==============================================
``kf:lease:{kernel_id}``                  hash    one lease (see :mod:`scheduler.leases`)
``kf:leases``                             zset    kernel_id scored by created time (unix s)
``kf:user:{user}:leases``                 set     kernel_ids of a user's leases
``kf:user:{user}:usage``                  hash    kernels, cpus_milli, memory, gpus held by user
``kf:pool:{pool}:leases``                 set     kernel_ids of the leases in a pool
``kf:pool:{pool}:usage``                  hash    kernels, cpus_milli, memory, gpus used in pool
``kf:pool:{pool}:states``                 hash    lease state -> number of leases in that state
``kf:pool:{pool}:gpus:free``              set     free GPU device indexes of the pool
``kf:pool:{pool}:gpus:held``              hash    GPU device index -> kernel_id holding it
``kf:pool:{pool}:meta``                   hash    gpu_devices: device count the free set is for
========================================  ======  ==============================================
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

PREFIX = "kf"
LEASES = f"{PREFIX}:leases"


def _part(name: str) -> str:
    """Encode a user-supplied name so it cannot break out of its key segment."""
    return quote(name, safe="")


def lease(kernel_id: str) -> str:
    """The hash of one lease."""
    return f"{PREFIX}:lease:{_part(kernel_id)}"


def user_leases(user: str) -> str:
    """The set of a user's kernel ids."""
    return f"{PREFIX}:user:{_part(user)}:leases"


def user_usage(user: str) -> str:
    """The hash of what a user holds across all pools."""
    return f"{PREFIX}:user:{_part(user)}:usage"


def pool_leases(pool: str) -> str:
    """The set of kernel ids in a pool."""
    return f"{PREFIX}:pool:{_part(pool)}:leases"


def pool_usage(pool: str) -> str:
    """The hash of what is used in a pool."""
    return f"{PREFIX}:pool:{_part(pool)}:usage"


def pool_states(pool: str) -> str:
    """The hash of lease counts by state in a pool."""
    return f"{PREFIX}:pool:{_part(pool)}:states"


def pool_gpus_free(pool: str) -> str:
    """The set of free GPU device indexes in a pool."""
    return f"{PREFIX}:pool:{_part(pool)}:gpus:free"


def pool_gpus_held(pool: str) -> str:
    """The hash of GPU device index -> kernel id holding it."""
    return f"{PREFIX}:pool:{_part(pool)}:gpus:held"


def pool_meta(pool: str) -> str:
    """The hash of bookkeeping about a pool's Redis state (device count of the free set)."""
    return f"{PREFIX}:pool:{_part(pool)}:meta"


@dataclass(frozen=True)
class LeaseKeys:
    """The keys that admitting or releasing one lease touches, in ``KEYS`` order.

    Admission and release scripts take exactly these, so both agree on positions.
    """

    lease: str
    leases: str
    user_leases: str
    user_usage: str
    pool_leases: str
    pool_usage: str
    pool_states: str
    gpus_free: str
    gpus_held: str
    pool_meta: str

    @classmethod
    def for_lease(cls, kernel_id: str, *, user: str, pool: str) -> LeaseKeys:
        """The keys of ``kernel_id`` owned by ``user`` in ``pool``."""
        return cls(
            lease=lease(kernel_id),
            leases=LEASES,
            user_leases=user_leases(user),
            user_usage=user_usage(user),
            pool_leases=pool_leases(pool),
            pool_usage=pool_usage(pool),
            pool_states=pool_states(pool),
            gpus_free=pool_gpus_free(pool),
            gpus_held=pool_gpus_held(pool),
            pool_meta=pool_meta(pool),
        )

    def as_list(self) -> list[str]:
        """The keys in the order the Lua scripts read them (KEYS[1] .. KEYS[10])."""
        return [
            self.lease,
            self.leases,
            self.user_leases,
            self.user_usage,
            self.pool_leases,
            self.pool_usage,
            self.pool_states,
            self.gpus_free,
            self.gpus_held,
            self.pool_meta,
        ]
