"""The Redis connection: how the scheduler connects, and how Redis failures look to it.

Redis is the scheduler's only store. When it is down the scheduler keeps serving and
answers 503 ``redis_unavailable``; redis-py reconnects on the next command, so it recovers
by itself when Redis is back (no restart).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
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


def connect(url: str, *, max_connections: int = MAX_CONNECTIONS) -> Redis:
    """A client for ``url`` that fails fast when Redis is down and reconnects when it is back.

    Connections are bounded and waited for (not refused) under bursts; one immediate retry
    replaces a pooled connection that a Redis restart left broken.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
        decode_responses=True,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        retry=Retry(NoBackoff(), 1),
    )
    return Redis.from_pool(pool)


@contextmanager
def unavailable_as(location: str) -> Iterator[None]:
    """Turn Redis connection failures inside the block into :class:`RedisUnavailable`."""
    try:
        yield
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as e:
        raise RedisUnavailable(
            messages.redis_unavailable(location), log_message=f"Redis at {location}: {e}"
        ) from e
