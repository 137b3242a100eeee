"""Fair queueing for full pools: who waits, in which order, and who gets in when room frees.

A request that finds its pool full (or others already waiting for it) and whose caller is
willing to wait gets a place in the pool's queue (the ADMIT script, :mod:`scheduler.lua`).
The order is *start-time fair queueing*: each request gets a tag one above the larger of
the pool's virtual time (the tag served last) and its user's own last waiting tag; requests
are served by tag, equal tags by arrival. So the queue is FIFO across users, and a user with
many requests gets every other place at most - round-robin between users - however early
they queued them all.

- **Promotion**: when room frees (a release, a request leaving), :meth:`Queue.promote`
  admits the head at once, then the next head while there is room; the head is never
  skipped for a smaller request behind it (no starvation of large requests). A head whose
  quota no longer allows it (the user started something else meanwhile) is refused and the
  next one gets its turn.
- **Time-out**: every request has a deadline (``kernel_launch_timeout`` at most);
  :meth:`Queue.expire` removes those past it and records where they stood.
- **Giving up**: a client that withdraws (``DELETE /v1/admissions/{id}``) leaves at once; a
  client that stops polling for ``heartbeat_timeout_s`` is taken to have given up. After a
  scheduler restart every entry gets a fresh heartbeat period.

All of this is in Redis; a scheduler killed and restarted loses no place in any queue.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from redis.asyncio import Redis

from . import keys, lua
from .admission import pool_capacity
from .batching import batcher_for
from .pools import Pool
from .store import unavailable_as

log = logging.getLogger(__name__)

#: Seconds without a poll after which a waiting request's client is taken to have given up.
HEARTBEAT_TIMEOUT_S = 30.0
_MAX_PROMOTIONS = 1000  # per call: bounds the loop if the queue changes under it


@dataclass(frozen=True)
class Entry:
    """A queue entry as stored: while waiting, and for a while after its outcome."""

    kernel_id: str
    user: str
    kernelspec: str
    pool: str
    state: str  # waiting, admitted, refused, timed_out, left, abandoned
    enqueued: float
    deadline: float
    position: int  # 1 = next in line; for a finished entry, where it stood when it left
    fields: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def groups(self) -> list[str]:
        """The groups the request was made with."""
        args = json.loads(self.fields.get("args") or "{}")
        return list(json.loads(args.get("groups") or "[]"))

    @property
    def admin(self) -> bool:
        """Whether the request was made by an admin."""
        return bool(json.loads(self.fields.get("args") or "{}").get("admin"))

    @property
    def waited(self) -> float:
        """Seconds waited until the outcome (0 while waiting)."""
        return float(self.fields.get("waited") or 0)

    @classmethod
    def from_redis(cls, fields: dict[str, str], *, position: int | None = None) -> Entry:
        """An entry from its hash; ``position`` from the queue for waiting ones."""
        stored = int(fields.get("position") or 0)
        return cls(
            kernel_id=fields["kernel_id"],
            user=fields["user"],
            kernelspec=fields["kernelspec"],
            pool=fields["pool"],
            state=fields.get("state", "waiting"),
            enqueued=float(fields.get("enqueued") or 0),
            deadline=float(fields.get("deadline") or 0),
            position=position if position is not None else stored,
            fields=fields,
        )


@dataclass(frozen=True)
class Outcome:
    """What happened to a request that left the queue (promotion, time-out, giving up)."""

    kernel_id: str
    pool: str
    decision: str  # admitted, refused, timed_out, left, abandoned
    waited: float
    reply: list[str] = field(default_factory=list)


def _kernel_of(member: str) -> str:
    return member.split("|", 1)[1]


class Queue:
    """The pools' queues in Redis. ``clock`` gives unix seconds (tests pass a fake one)."""

    def __init__(
        self,
        redis: Redis,
        *,
        pools: Mapping[str, Pool],
        location: str,
        clock: Callable[[], float] = time.time,
        heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
    ) -> None:
        self._redis = redis
        self._pools = pools
        self._location = location
        self._clock = clock
        self.heartbeat_timeout_s = heartbeat_timeout_s
        # Clients could not poll while no scheduler ran: heartbeats count from the first sweep.
        self._heartbeats_from: float | None = None
        self._promote = redis.register_script(lua.PROMOTE)
        self._leave = redis.register_script(lua.LEAVE)
        self._batcher = batcher_for(redis)

    def _now(self) -> float:
        return round(self._clock(), 3)

    async def entry(self, kernel_id: str, *, touch: bool = False) -> Entry | None:
        """The entry of ``kernel_id`` with its current position; ``touch`` counts as a poll."""
        with unavailable_as(self._location):
            if touch:
                await self._redis.zadd(keys.QUEUE_SEEN, {kernel_id: self._now()}, xx=True)
            fields = await self._redis.hgetall(keys.queued(kernel_id))
            if not fields:
                return None
            position = None
            if fields.get("state") == "waiting":
                rank = await self._redis.zrank(keys.pool_queue(fields["pool"]), fields["member"])
                position = rank + 1 if rank is not None else 0
        return Entry.from_redis(fields, position=position)

    async def leave(self, kernel_id: str, *, state: str = "left") -> Outcome | None:
        """Take a waiting request out of its queue; None if it was not waiting."""
        with unavailable_as(self._location):
            found = await self._redis.hmget(keys.queued(kernel_id), ["user", "pool", "enqueued"])
            user, pool, enqueued = found
            if user is None or pool is None:
                return None
            script_keys = keys.ScriptKeys.list_for(kernel_id, user=user, pool=pool)
            now = self._now()
            reply = await self._leave(keys=script_keys, args=[state, repr(now)])
        if reply[0] != "left":
            return None
        log.info("kernel %s of %s left the queue of pool %s (%s) at position %s",
                 kernel_id, user, pool, state, reply[1])  # fmt: skip
        waited = max(0.0, now - float(enqueued or now))
        return Outcome(kernel_id=kernel_id, pool=pool, decision=state, waited=waited)

    async def promote(self, pool: str) -> list[Outcome]:
        """Admit heads of ``pool``'s queue while they fit; refuse heads over their quota."""
        outcomes: list[Outcome] = []
        capacity = pool_capacity(self._pools[pool])
        batcher = self._batcher
        with unavailable_as(self._location):
            for _ in range(_MAX_PROMOTIONS):
                head = await batcher.command("ZRANGE", keys.pool_queue(pool), 0, 0)
                if not head:
                    break
                kernel_id = _kernel_of(head[0])
                user = await batcher.command("HGET", keys.queued(kernel_id), "user")
                if user is None:  # the entry expired under a stray member: drop it
                    await batcher.command("ZREM", keys.pool_queue(pool), head[0])
                    continue
                script_keys = keys.ScriptKeys.list_for(kernel_id, user=user, pool=pool)
                args = [head[0], json.dumps({"now": self._now(), "capacity": capacity})]
                reply = await batcher.script(self._promote, script_keys, args)
                if reply[0] == "wait":
                    break
                if reply[0] in ("stale", "not_head"):
                    continue
                outcome = self._promoted(kernel_id, user, pool, reply)
                outcomes.append(outcome)
        return outcomes

    def _promoted(self, kernel_id: str, user: str, pool: str, reply: list[str]) -> Outcome:
        if reply[0] == "admitted":
            log.info("admitted kernel %s of %s from the queue of pool %s after %s s, GPUs [%s]",
                     kernel_id, user, pool, reply[2], reply[1])  # fmt: skip
            return Outcome(kernel_id=kernel_id, pool=pool, decision="admitted",
                           waited=float(reply[2]), reply=list(reply))  # fmt: skip
        log.info("refused kernel %s of %s at the head of pool %s's queue: %s",
                 kernel_id, user, pool, reply)  # fmt: skip
        return Outcome(kernel_id=kernel_id, pool=pool, decision="refused", waited=0.0,
                       reply=list(reply))  # fmt: skip

    async def expire(self) -> list[Outcome]:
        """Remove requests past their deadline (timed_out) or not polled (abandoned)."""
        now = self._now()
        with unavailable_as(self._location):
            due = await self._redis.zrangebyscore(keys.QUEUE_DEADLINES, "-inf", now)
            stale: list[str] = []
            if self._heartbeats_from is None:
                self._heartbeats_from = now
            if now >= self._heartbeats_from + self.heartbeat_timeout_s:
                cutoff = now - self.heartbeat_timeout_s
                stale = await self._redis.zrangebyscore(keys.QUEUE_SEEN, "-inf", cutoff)
        outcomes = []
        for kernel_id, state in [(k, "timed_out") for k in due] + [
            (k, "abandoned") for k in stale if k not in due
        ]:
            outcome = await self.leave(kernel_id, state=state)
            if outcome is None:  # an index entry without a waiting request: tidy it
                with unavailable_as(self._location):
                    await self._redis.zrem(keys.QUEUE_DEADLINES, kernel_id)
                    await self._redis.zrem(keys.QUEUE_SEEN, kernel_id)
            else:
                outcomes.append(outcome)
        return outcomes

    async def waiting(self, pool: str) -> list[Entry]:
        """The requests waiting for ``pool``, next first."""
        with unavailable_as(self._location):
            members = await self._redis.zrange(keys.pool_queue(pool), 0, -1)
            rows = await self._entries([_kernel_of(m) for m in members])
        return [
            Entry.from_redis(row, position=i)
            for i, row in enumerate((r for r in rows if r), start=1)
        ]

    async def of_user(self, user: str) -> list[Entry]:
        """A user's waiting requests, all pools, with their positions."""
        with unavailable_as(self._location):
            kernel_ids = sorted(await self._redis.smembers(keys.user_queued(user)))
            rows = [row for row in await self._entries(kernel_ids) if row]
            pipe = self._redis.pipeline(transaction=False)
            for row in rows:
                pipe.zrank(keys.pool_queue(row["pool"]), row["member"])
            ranks = await pipe.execute()
        entries = [
            Entry.from_redis(row, position=rank + 1)
            for row, rank in zip(rows, ranks, strict=True)
            if rank is not None
        ]
        return sorted(entries, key=lambda e: (e.pool, e.position))

    async def lengths(self) -> dict[str, int]:
        """How many requests wait for each pool."""
        names = list(self._pools)
        with unavailable_as(self._location):
            pipe = self._redis.pipeline(transaction=False)
            for name in names:
                pipe.zcard(keys.pool_queue(name))
            counts = await pipe.execute()
        return dict(zip(names, (int(c) for c in counts), strict=True))

    async def _entries(self, kernel_ids: list[str]) -> list[dict[str, str]]:
        if not kernel_ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for kernel_id in kernel_ids:
            pipe.hgetall(keys.queued(kernel_id))
        return list(await pipe.execute())
