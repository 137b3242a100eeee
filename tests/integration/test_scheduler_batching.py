"""Batched Redis calls (scheduler.batching) against a real Redis: concurrent admissions decide
exactly as one-by-one ones would, each caller gets its own reply or error, a lost connection
fails only the calls waiting on it and the next call connects again; the fair pool waits
for connections in arrival order."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import redis as sync_redis
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from kernelfleet.config import PlatformConfig
from kernelfleet.kernelspecs.spec import KernelSpec
from scheduler import batching, keys
from scheduler.admission import Admission
from scheduler.batching import Batcher, Packed, batcher_for
from scheduler.errors import PoolFull, QuotaExceeded, RedisUnavailable
from scheduler.pools import HostProbe, resolve_pools
from scheduler.service import Scheduler
from scheduler.store import FairPool, connect
from tests.support.redis_server import RedisServer, running_redis

GIB = 2**30
MakeScheduler = Callable[..., Scheduler]

PLATFORM = PlatformConfig.model_validate(
    {
        "pools": {"cpu": {"cpus": 10, "memory": "100Gi"}},
        "quotas": {"default": {"kernels": 2}},
    }
)
KERNELSPECS = {
    "small": KernelSpec(
        name="small", display_name="small", pool="cpu",
        resources={"cpus": 1, "memory": GIB, "gpus": 0},
    )
}  # fmt: skip
HOST = HostProbe(cpu_count=lambda: 2, memory_bytes=lambda: 8 * GIB, gpu_count=lambda: 0)
ECHO = "if ARGV[1] == 'bad' then return redis.error_reply('boom') end return {ARGV[1], KEYS[1]}"


async def _decide(scheduler: Scheduler, kernel_id: str, user: str) -> str:
    try:
        admitted = await scheduler.admit(
            kernel_id=kernel_id, user=user, groups=[], kernelspec="small"
        )
    except (PoolFull, QuotaExceeded) as e:
        return e.code
    assert isinstance(admitted, Admission)
    assert admitted.lease.kernel_id == kernel_id  # its own reply, not another caller's
    return "admitted"


async def test_concurrent_admissions_decide_as_sequential_ones(
    make_scheduler: MakeScheduler, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = Counter[str]()
    flush = batching._Link._flush

    def counting(link: batching._Link) -> None:
        writes["writes"] += 1
        flush(link)

    monkeypatch.setattr(batching._Link, "_flush", counting)
    requests = [(f"k{i}", f"u{i % 8}") for i in range(200)]  # 8 users of quota 2, 10 CPUs

    one_by_one = make_scheduler(PLATFORM, KERNELSPECS)
    sequential = Counter([await _decide(one_by_one, k, u) for k, u in requests])
    redis_server.flush()
    writes.clear()
    together = make_scheduler(PLATFORM, KERNELSPECS)
    concurrent = Counter(await asyncio.gather(*(_decide(together, k, u) for k, u in requests)))

    assert concurrent == sequential == {"admitted": 10, "pool_full": 144, "quota_exceeded": 46}
    assert writes["writes"] < 20  # 200 scripts went out in a few writes
    usage = await together.redis.hgetall(keys.pool_usage("cpu"))
    assert usage["kernels"] == "10" and usage["cpus_milli"] == "10000"  # nothing over-committed
    leases = await together.leases.list()
    assert Counter(lease.user for lease in leases) == {f"u{i}": 2 if i < 2 else 1 for i in range(8)}

    released = await asyncio.gather(*(together.release(lease.kernel_id) for lease in leases))
    assert all(released)
    assert await together.redis.hgetall(keys.pool_usage("cpu")) == {
        "kernels": "0", "cpus_milli": "0", "memory": "0", "gpus": "0", "starting": "0"
    }  # fmt: skip


async def test_an_error_reaches_only_its_caller(redis_url: str) -> None:
    client = connect(redis_url)
    try:
        batcher = Batcher(client)
        echo = client.register_script(ECHO)
        await client.set("a-string", "x")
        values = [f"v{i}" for i in range(30)]
        values[7] = "bad"
        calls = [batcher.script(echo, ["key"], [v]) for v in values]
        calls.append(batcher.command("HGETALL", "a-string"))  # WRONGTYPE, in the same write
        calls.append(batcher.command("GET", "a-string"))
        got = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(got[7], redis_errors.ResponseError) and "boom" in str(got[7])
        assert isinstance(got[30], redis_errors.ResponseError) and "WRONGTYPE" in str(got[30])
        assert got[31] == "x"
        assert [g for i, g in enumerate(got[:30]) if i != 7] == [
            [v, "key"] for i, v in enumerate(values) if i != 7
        ]
    finally:
        await client.aclose()


async def test_a_script_redis_lost_is_loaded_again(redis_url: str) -> None:
    client = connect(redis_url)
    try:
        batcher = batcher_for(client)
        echo = client.register_script(ECHO)
        assert await batcher.script(echo, ["k"], ["one"]) == ["one", "k"]
        await client.script_flush()
        got = await asyncio.gather(*(batcher.script(echo, ["k"], [str(i)]) for i in range(5)))
        assert got == [[str(i), "k"] for i in range(5)]
    finally:
        await client.aclose()


async def test_a_dropped_connection_fails_its_callers_and_the_next_call_reconnects(
    redis_url: str,
) -> None:
    client = connect(redis_url)
    try:
        batcher = batcher_for(client)
        assert await batcher.command("PING") == "PONG"
        blocked = asyncio.ensure_future(batcher.command("BLPOP", "never", 0))
        queued = [asyncio.ensure_future(batcher.command("PING")) for _ in range(5)]
        await asyncio.sleep(0.2)  # all written; the rest wait behind BLPOP
        with sync_redis.Redis.from_url(redis_url) as other:
            assert other.client_kill_filter(_type="normal", skipme=True) >= 1
        for call in [blocked, *queued]:
            with pytest.raises(redis_errors.ConnectionError):
                await call
        assert await batcher.command("PING") == "PONG"  # a new connection
    finally:
        await client.aclose()


async def test_no_reply_within_the_socket_timeout_drops_the_connection(redis_url: str) -> None:
    client = Redis.from_url(redis_url, decode_responses=True, socket_timeout=0.3)
    try:
        batcher = Batcher(client)
        began = time.monotonic()
        with pytest.raises(redis_errors.TimeoutError):
            await batcher.command("BLPOP", "never", 0)
        assert 0.25 < time.monotonic() - began < 2
        assert await batcher.command("PING") == "PONG"
    finally:
        await client.aclose()


async def test_redis_down_is_redis_unavailable_and_admission_resumes_when_back(
    tmp_path: Path,
) -> None:
    with running_redis(tmp_path / "redis") as server:
        client = connect(server.url)
        try:
            scheduler = Scheduler.from_config(
                client, PLATFORM, pools=resolve_pools(PLATFORM, probe=HOST),
                kernelspecs=KERNELSPECS, location="test-redis",
            )  # fmt: skip
            assert await _decide(scheduler, "before", "alice") == "admitted"
            server.stop()
            with pytest.raises(RedisUnavailable):
                await _decide(scheduler, "during", "alice")
            with pytest.raises(RedisUnavailable):
                await scheduler.release("before")
            server.start()  # same port, no persistence: an empty Redis
            assert await _decide(scheduler, "after", "alice") == "admitted"
            assert await scheduler.release("after")
        finally:
            await client.aclose()


async def test_closing_the_client_closes_the_batch_connection(redis_url: str) -> None:
    client = connect(redis_url)
    batcher = batcher_for(client)
    assert await batcher.command("CLIENT", "SETNAME", "kf-batch") == "OK"
    with sync_redis.Redis.from_url(redis_url, decode_responses=True) as other:
        assert "kf-batch" in [c["name"] for c in other.client_list()]
        await client.connection_pool.disconnect()
        await asyncio.sleep(0.1)
        assert "kf-batch" not in [c["name"] for c in other.client_list()]
        assert await batcher.command("PING") == "PONG"  # usable again, like the pool
        await client.aclose()


async def test_a_stale_owner_hint_costs_a_read_not_a_wrong_release(
    make_scheduler: MakeScheduler,
) -> None:
    scheduler = make_scheduler(PLATFORM, KERNELSPECS)
    assert await _decide(scheduler, "k1", "alice") == "admitted"
    scheduler.leases.remember("k1", user="mallory", pool="cpu")
    assert await scheduler.release("k1")
    assert await scheduler.leases.get("k1") is None
    assert not await scheduler.release("k1")  # gone
    usage = await scheduler.redis.hgetall(keys.pool_usage("cpu"))
    assert usage["kernels"] == "0"


async def test_a_release_still_admits_the_head_of_the_queue_at_once(
    make_scheduler: MakeScheduler,
) -> None:
    scheduler = make_scheduler(PLATFORM, KERNELSPECS)
    held = [f"k{i}" for i in range(10)]
    for i, kernel_id in enumerate(held):
        assert await _decide(scheduler, kernel_id, f"u{i // 2}") == "admitted"
    queued = await scheduler.admit(
        kernel_id="waiter", user="w", groups=[], kernelspec="small", wait_s=30
    )
    assert getattr(queued, "position", None) == 1
    assert await scheduler.release(held[0])
    lease = await scheduler.leases.get("waiter")
    assert lease is not None and lease.state == "starting"


async def test_the_fair_pool_hands_out_connections_in_arrival_order(redis_url: str) -> None:
    # redis-py's BlockingConnectionPool failed ~4% of these ("No connection available"):
    # a connection given back reached a waiter only after every caller queued on its lock.
    pool = FairPool.from_url(redis_url, max_connections=8, timeout=1.5, decode_responses=True)
    client = Redis.from_pool(pool)

    async def worker() -> int:
        failed = 0
        for _ in range(10):
            try:
                await client.incr("n")
            except redis_errors.ConnectionError:
                failed += 1
        return failed

    try:
        assert sum(await asyncio.gather(*(worker() for _ in range(1000)))) == 0
        assert await client.get("n") == "10000"
    finally:
        await client.aclose()


async def test_shared_keys_come_first_and_are_packed_once(redis_url: str) -> None:
    client = connect(redis_url)
    try:
        batched, one_by_one = Batcher(client), Batcher(client)
        one_by_one.batched = False  # as for TLS or a credential provider
        every = client.register_script("return {KEYS, ARGV}")
        shared = ("owner:a", "owner:b")
        for batcher in (batched, one_by_one):
            got = await asyncio.gather(
                *(batcher.script(every, [f"kernel:{i}"], [i, "x"], shared=shared) for i in range(3))
            )
            assert got == [[["owner:a", "owner:b", f"kernel:{i}"], [str(i), "x"]] for i in range(3)]
        # another script with the same shared keys gets its own packed head
        other = client.register_script("return #KEYS")
        assert await batched.script(other, ["k1", "k2"], [], shared=shared) == 4
    finally:
        await client.aclose()


async def test_a_packed_tail_ends_the_arguments(redis_url: str) -> None:
    client = connect(redis_url)
    try:
        batched, one_by_one = Batcher(client), Batcher(client)
        one_by_one.batched = False
        every = client.register_script("return {KEYS, ARGV}")
        tail = Packed(("user", 3, "é"))
        for batcher in (batched, one_by_one):
            got = await batcher.script(every, ["kernel"], ["id", 1.5], shared=("owner",), tail=tail)
            assert got == [["owner", "kernel"], ["id", "1.5", "user", "3", "é"]]
            assert await batcher.script(every, ["k"], [], tail=tail) == [["k"], ["user", "3", "é"]]
    finally:
        await client.aclose()


async def test_unbatched_connections_answer_in_the_same_shapes(redis_url: str) -> None:
    client = connect(redis_url)
    try:
        batched, one_by_one = Batcher(client), Batcher(client)
        one_by_one.batched = False  # as for TLS or a credential provider
        echo = client.register_script(ECHO)
        await client.zadd("z", {"a|1": 1, "b|2": 2})
        await client.hset("h", mapping={"user": "alice", "pool": "cpu"})
        for batcher in (batched, one_by_one):
            assert await batcher.script(echo, ["k"], ["v"]) == ["v", "k"]
            assert await batcher.command("ZRANGE", "z", 0, 0) == ["a|1"]
            assert await batcher.command("ZRANGE", "nothing", 0, 0) == []
            assert await batcher.command("HGET", "h", "user") == "alice"
            assert await batcher.command("HGET", "h", "nope") is None
            assert await batcher.command("HMGET", "h", "user", "nope") == ["alice", None]
        assert await one_by_one.command("ZREM", "z", "a|1") == 1
        assert await batched.command("ZREM", "z", "b|2") == 1
    finally:
        await client.aclose()


async def test_the_batch_connection_logs_in_and_selects_the_database(tmp_path: Path) -> None:
    with running_redis(tmp_path / "redis") as server:
        with sync_redis.Redis(port=server.port) as admin:
            admin.config_set("requirepass", "s3cret")
        client = connect(f"redis://:s3cret@127.0.0.1:{server.port}/2")
        wrong = connect(f"redis://:wrong@127.0.0.1:{server.port}/2")
        try:
            assert await batcher_for(client).command("SET", "where", "db2") == "OK"
            assert await client.get("where") == "db2"  # redis-py's pool: same database
            with pytest.raises(redis_errors.AuthenticationError):
                await batcher_for(wrong).command("PING")
        finally:
            await client.aclose()
            await wrong.aclose()
