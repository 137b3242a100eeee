"""Integration fixtures: a real Redis server, emptied before every test; scheduler builders.

``redis_url`` gives each test a clean Redis (FLUSHALL) on one server started per run;
``redis_server`` is that server. A test that stops Redis must use its own server
(``running_redis`` from tests.support.redis_server), not this shared one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping

import pytest

from kernelfleet.config import PlatformConfig
from kernelfleet.kernelspecs.spec import KernelSpec
from scheduler.pools import HostProbe, resolve_pools
from scheduler.service import Scheduler
from scheduler.store import connect, describe
from tests.support.redis_server import RedisServer, running_redis

#: A pretend host for capacity "host": 2 CPUs, 8 GiB, no GPUs (before overcommit).
TEST_HOST = HostProbe(cpu_count=lambda: 2, memory_bytes=lambda: 8 * 2**30, gpu_count=lambda: 0)

MakeScheduler = Callable[..., Scheduler]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole run (no persistence)."""
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of a Redis that is empty when the test starts."""
    redis_server.flush()
    return redis_server.url


@pytest.fixture
async def make_scheduler(redis_url: str) -> AsyncIterator[MakeScheduler]:
    """Build Schedulers on the clean Redis: ``make(platform, kernelspecs, clock=..., url=...)``.

    Pools are resolved against TEST_HOST; every Redis client made is closed after the test.
    """
    clients = []

    def make(
        platform: PlatformConfig,
        kernelspecs: Mapping[str, KernelSpec],
        *,
        clock: Callable[[], float] | None = None,
        url: str = redis_url,
    ) -> Scheduler:
        client = connect(url)
        clients.append(client)
        extra = {"clock": clock} if clock is not None else {}
        return Scheduler.from_config(
            client, platform, pools=resolve_pools(platform, probe=TEST_HOST),
            kernelspecs=kernelspecs, location=describe(url), **extra,
        )  # fmt: skip

    yield make
    for client in clients:
        await client.aclose()
