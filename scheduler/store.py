"""The Redis connection: how the scheduler connects, and how Redis failures look to it.

Redis is the scheduler's only store. When it is down the scheduler keeps serving and
answers 503 ``redis_unavailable``; redis-py reconnects on the next command, so it recovers
by itself when Redis is back (no restart).
"""

from __future__ import annotations

import asyncio
import weakref
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urlsplit

from redis import exceptions as redis_errors
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from . import messages
from .errors import RedisUnavailable

MAX_CONNECTIONS = 64
POOL_WAIT_S = 5.0
SOCKET_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0


def describe(url: str) -> str:
    """Where Redis is, for messages: ``127.0.0.1:16379``; never the password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    host = parts.hostname or "localhost"
    return f"{host}:{parts.port or 6379}"


class Closable(Protocol):
    def close(self) -> None: ...


class FairPool(ConnectionPool):
    """At most ``max_connections``, handed out first come, first served; waits ``timeout`` s.

    redis-py's BlockingConnectionPool waits on a Condition whose lock ``release`` must take
    too: with hundreds of callers queued on that lock, a connection given back reaches a
    waiter only after all of them, and some waited past the timeout (9% of admissions at 500
    concurrent failed ``redis_unavailable``). Here a FIFO semaphore admits callers and
    giving back never waits. ``attach``: objects closed with the pool's connections
    (the :class:`scheduler.batching.Batcher` connection).
    """

    def __init__(
        self,
        *,
        max_connections: int = MAX_CONNECTIONS,
        timeout: float | None = POOL_WAIT_S,
        **kwargs: Any,
    ) -> None:
        super().__init__(max_connections=max_connections, **kwargs)
        self.timeout = timeout
        self._slots = asyncio.Semaphore(max_connections)
        self._holding: set[int] = set()  # ids of the connections handed out, one slot each
        self._attached: weakref.WeakSet[Closable] = weakref.WeakSet()

    def attach(self, closable: Closable) -> None:
        """Close ``closable`` whenever this pool disconnects."""
        self._attached.add(closable)

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            await asyncio.wait_for(self._slots.acquire(), self.timeout)
        except asyncio.TimeoutError as e:
            raise redis_errors.ConnectionError("No connection available.") from e
        try:
            connection = await super().get_connection(*args, **kwargs)
        except BaseException:
            self._slots.release()
            raise
        self._holding.add(id(connection))
        return connection

    async def release(self, connection: Any) -> None:
        try:
            await super().release(connection)
        finally:
            if id(connection) in self._holding:
                self._holding.discard(id(connection))
                self._slots.release()

    async def disconnect(self, inuse_connections: bool = True) -> None:
        for closable in list(self._attached):
            closable.close()
        await super().disconnect(inuse_connections)


def connect(url: str, *, max_connections: int = MAX_CONNECTIONS) -> Redis:
    """A client for ``url`` that fails fast when Redis is down and reconnects when it is back.

    Connections are bounded and waited for in arrival order (not refused) under bursts;
    one immediate retry replaces a pooled connection that a Redis restart left broken.
    """
    pool = FairPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
        decode_responses=True,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        retry=Retry(NoBackoff(), 1),
    )
    return Redis.from_pool(pool)


_UNAVAILABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)


class unavailable_as:  # lower case: used like a function, ``with unavailable_as(...)``
    """Turn Redis connection failures inside the block into :class:`RedisUnavailable`.

    A class, not a ``@contextmanager`` generator: every admission and release enters one,
    and a generator costs several times more to enter and leave.
    """

    __slots__ = ("_location",)

    def __init__(self, location: str) -> None:
        self._location = location

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        if isinstance(error, _UNAVAILABLE):
            location = self._location
            raise RedisUnavailable(
                messages.redis_unavailable(location), log_message=f"Redis at {location}: {error}"
            ) from error
