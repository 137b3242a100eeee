"""The scheduler as a real process over a real Redis with AOF: kill -9 and restart lose no
lease and no queue entry and admissions resume within 2 s; while Redis is down admissions
fail closed with 503, running kernels are left alone, and it all recovers by itself.

A stand-in Enterprise Gateway (a threaded HTTP server) lists "running" kernels and records
every shutdown the scheduler's reconciliation asks for.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.support.ports import free_port
from tests.support.redis_server import running_redis
from tests.support.scheduler_stack import (
    GATEWAY_TOKEN,
    SERVICE_TOKEN,
    GatewayStandIn,
    Stack,
    write_config,
)

RESUME_WITHIN_S = 2.0


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    GatewayStandIn.running = set()
    GatewayStandIn.shutdowns = []
    eg = ThreadingHTTPServer(("127.0.0.1", 0), GatewayStandIn)
    threading.Thread(target=eg.serve_forever, daemon=True).start()
    with running_redis(tmp_path / "redis", persist=True) as redis:
        made = Stack(folder=tmp_path, redis=redis, port=free_port())
        write_config(
            tmp_path, scheduler_port=made.port, redis_port=redis.port, eg_port=eg.server_address[1]
        )
        made.start()
        try:
            yield made
        finally:
            made.stop()
            eg.shutdown()
            eg.server_close()


def _client(stack: Stack) -> httpx.Client:
    return httpx.Client(
        base_url=stack.url, headers={"Authorization": f"token {SERVICE_TOKEN}"}, timeout=5
    )


def _admission(kernel_id: str, user: str, kernelspec: str, groups: list[str]) -> dict:
    return {"kernel_id": kernel_id, "user": user, "groups": groups, "kernelspec": kernelspec}


def _state(client: httpx.Client) -> tuple[list[dict], list[dict]]:
    leases = client.get("/v1/leases").json()["leases"]
    queues = client.get("/v1/queues").json()["queues"]
    return leases, queues


def _kill_and_restart(stack: Stack) -> float:
    """kill -9, start again; seconds from the kill until an admission succeeded."""
    stack.kill()
    began = time.monotonic()
    stack.start()
    body = _admission(f"after-{uuid.uuid4().hex[:6]}", "bob", "python-cpu", [])
    with _client(stack) as client:
        while client.post("/v1/admissions", json=body).status_code != 201:
            time.sleep(0.01)
    return time.monotonic() - began


def test_kill_9_loses_nothing_and_admissions_resume_within_2_s(stack: Stack) -> None:
    with _client(stack) as client:
        for kernel_id, user, spec, groups in [
            ("cpu-1", "alice", "python-cpu", []),
            ("gpu-1", "carol", "python-gpu", ["ml"]),
            ("gpu-2", "dave", "python-gpu", ["ml"]),
        ]:
            assert client.post("/v1/admissions", json=_admission(kernel_id, user, spec, groups))
        GatewayStandIn.running |= {"cpu-1", "gpu-1", "gpu-2"}
        for kernel_id, user in [("wait-1", "erin"), ("wait-2", "frank")]:
            body = _admission(kernel_id, user, "python-gpu", ["ml"])
            queued = client.post("/v1/admissions", json=body, params={"wait_s": 60})
            assert queued.status_code == 202, queued.text
        before = _state(client)
        assert [e["kernel_id"] for e in before[1][1]["entries"]] == ["wait-1", "wait-2"]

    resumed = [_kill_and_restart(stack) for _ in range(3)]
    with _client(stack) as client:
        leases, queues = _state(client)
        assert [x for x in leases if x["user"] != "bob"] == before[0]  # nothing lost
        assert queues == before[1]
        # the best of three restarts, so that load spikes on a shared machine do not fail it
        # (a restart is ~1.3 s idle, nearly all of it Python importing FastAPI and redis-py)
        assert min(resumed) < RESUME_WITHIN_S, f"admissions resumed after {resumed} s"

        # the restarted scheduler admits the head at once when room frees
        assert client.delete("/v1/leases/gpu-1").json() == {"released": True}
        GatewayStandIn.running.discard("gpu-1")
        admitted = client.get("/v1/admissions/wait-1")
        assert admitted.status_code == 200 and admitted.json()["lease"]["gpu_devices"] == [0]
        assert client.get("/v1/users/frank/queue").json()["entries"][0]["position"] == 1
    assert GatewayStandIn.shutdowns == []


def test_redis_outage_fails_closed_then_recovers_by_itself(stack: Stack) -> None:
    with _client(stack) as client:
        body = _admission("alive", "alice", "python-cpu", [])
        assert client.post("/v1/admissions", json=body).status_code == 201
        GatewayStandIn.running.add("alive")
        time.sleep(0.6)  # a few reconciliation rounds: the kernel holds a lease

        stack.redis.stop()
        refused = client.post("/v1/admissions", json=_admission("new", "bob", "python-cpu", []))
        assert refused.status_code == 503
        assert refused.json() == {
            "error": "redis_unavailable",
            "message": f"Redis at 127.0.0.1:{stack.redis.port} is unreachable; the scheduler "
            "cannot admit or release kernels until it is back (it reconnects by itself). "
            "Start Redis, e.g. with `kernelfleet up`.",
        }
        assert client.get("/healthz").status_code == 503
        assert client.delete("/v1/leases/alive").status_code == 503
        time.sleep(1.0)  # reconciliation keeps running (and failing) meanwhile
        assert stack.process is not None and stack.process.poll() is None

        stack.redis.start()  # same data dir: the AOF brings the lease back
        deadline = time.monotonic() + 5
        while client.get("/healthz").status_code != 200:
            assert time.monotonic() < deadline, "the scheduler did not reconnect"
            time.sleep(0.05)
        assert [x["kernel_id"] for x in client.get("/v1/leases").json()["leases"]] == ["alive"]
        assert (
            client.post(
                "/v1/admissions", json=_admission("new", "bob", "python-cpu", [])
            ).status_code
            == 201
        )
        time.sleep(0.6)
    assert GatewayStandIn.shutdowns == []  # the running kernel was never touched
    log = stack.log()
    assert log.count("background step reconcile failed") == 1  # one line, not one per round
    assert "background step reconcile works again" in log
    assert SERVICE_TOKEN not in log and GATEWAY_TOKEN not in log


def test_reconciliation_stops_kernels_without_a_lease(stack: Stack) -> None:
    GatewayStandIn.running.add("stray")
    deadline = time.monotonic() + 5
    while "stray" not in GatewayStandIn.shutdowns:
        assert time.monotonic() < deadline, stack.log()
        time.sleep(0.05)
    assert "reconciliation: stopped kernel stray: it held no lease" in stack.log()
