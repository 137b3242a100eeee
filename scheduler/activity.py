"""Activity reports from the gateway: what each kernel is doing, applied to its lease.

The gateway sends batches (``PUT /v1/activity``) of the current execution state, last
activity and open connections of its kernels. Each report is a snapshot, so applying the
same one twice changes nothing. The kernel's execution state moves its lease:

==========================================  ===============================================
execution state                             lease
==========================================  ===============================================
``idle``                                    ``idle``
``busy``                                    ``busy``
``starting``, ``restarting``, ...           ``starting``
``dead``                                    released (stopped, reason ``died``): the kernel
                                            is gone, its resources go to the queue's head
anything else (``unknown``)                 state kept; activity and connections recorded
==========================================  ===============================================
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from redis.asyncio import Redis

from . import keys, lua
from .store import unavailable_as

log = logging.getLogger(__name__)

DEAD = "dead"
_STARTING = frozenset({"starting", "restarting", "autorestarting", "connecting"})


def lease_state(execution_state: str) -> str | None:
    """The lease state for a kernel's execution state: ``dead``, a state, or None (keep)."""
    if execution_state in ("idle", "busy", DEAD):
        return execution_state
    if execution_state in _STARTING:
        return "starting"
    return None


@dataclass(frozen=True)
class Report:
    """One kernel's activity as the gateway saw it."""

    kernel_id: str
    execution_state: str
    last_activity: float | None = None
    connections: int = 0


@dataclass
class Applied:
    """What a batch did: leases updated, kernels reported dead, kernels without a lease."""

    updated: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


class ActivityRecorder:
    """Applies activity reports to leases. ``clock`` gives unix seconds."""

    def __init__(
        self, redis: Redis, *, location: str, clock: Callable[[], float] = time.time
    ) -> None:
        self._redis = redis
        self._location = location
        self._clock = clock
        self._script = redis.register_script(lua.ACTIVITY)

    async def apply(self, reports: Iterable[Report]) -> Applied:
        """Record the reports (the last one per kernel wins). Dead kernels are only listed:
        the caller releases them, so that the queue's head gets their room."""
        latest = {report.kernel_id: report for report in reports}
        applied = Applied()
        live = []
        for report in latest.values():
            state = lease_state(report.execution_state)
            if state == DEAD:
                applied.dead.append(report.kernel_id)
            else:
                live.append((report, state))
        if not live:
            return applied
        now = self._clock()
        with unavailable_as(self._location):
            pipe = self._redis.pipeline(transaction=False)
            for report, _ in live:
                pipe.hmget(keys.lease(report.kernel_id), ["user", "pool"])
            owners = await pipe.execute()
            pipe = self._redis.pipeline(transaction=False)
            sent = []
            for (report, state), (user, pool) in zip(live, owners, strict=True):
                if user is None or pool is None:
                    applied.unknown.append(report.kernel_id)
                    continue
                script_keys = keys.ScriptKeys.list_for(report.kernel_id, user=user, pool=pool)
                seen = min(report.last_activity or 0.0, now)  # never in the future
                args = [state or "", repr(round(seen, 3)), str(report.connections)]
                await self._script(keys=script_keys, args=args, client=pipe)
                sent.append(report.kernel_id)
            replies = await pipe.execute() if sent else []
        for kernel_id, reply in zip(sent, replies, strict=True):
            (applied.updated if reply[0] == "updated" else applied.unknown).append(kernel_id)
        return applied
