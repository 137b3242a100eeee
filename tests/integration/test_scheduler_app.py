"""The scheduler's HTTP API (docs/contracts.md) on the demo config, against a real Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from kernelfleet.config import load_config
from kernelfleet.kernelspecs.spec import load_kernelspecs
from scheduler.app import create_app
from scheduler.metrics import SchedulerMetrics
from scheduler.service import Scheduler
from tests.support.redis_server import running_redis

REPO = Path(__file__).resolve().parents[2]

TOKEN = "t0k3n-" + uuid.uuid4().hex
AUTH = {"Authorization": f"token {TOKEN}"}
GIB = 2**30
MakeScheduler = Callable[..., Scheduler]


def _client(scheduler: Scheduler, *, headers: dict[str, str] = AUTH) -> httpx.AsyncClient:
    app = create_app(scheduler, token=TOKEN, metrics=SchedulerMetrics())
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="http://scheduler", headers=headers)


def _demo_scheduler(make_scheduler: MakeScheduler, **kwargs: object) -> Scheduler:
    platform = load_config(REPO / "kernelfleet.yaml")
    return make_scheduler(platform, load_kernelspecs(platform.kernelspecs_dir, platform), **kwargs)


@pytest.fixture
def demo(make_scheduler: MakeScheduler) -> Scheduler:
    return _demo_scheduler(make_scheduler)


@pytest.fixture
async def client(demo: Scheduler) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(demo) as client:
        yield client


def _admission(user: str, kernelspec: str, groups: list[str], **extra: object) -> dict:
    body = {"kernel_id": str(uuid.uuid4()), "user": user, "groups": groups}
    return {**body, "kernelspec": kernelspec, **extra}


async def test_v1_needs_the_service_token(demo: Scheduler) -> None:
    async with _client(demo, headers={}) as client:
        for headers in ({}, {"Authorization": "token wrong"}, {"Authorization": TOKEN}):
            for method, path in (("GET", "/v1/pools"), ("POST", "/v1/nothing-here")):
                response = await client.request(method, path, headers=headers)
                assert response.status_code == 401
                assert response.json()["error"] == "unauthorized"
                assert TOKEN not in response.text
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert (await client.get("/v1/pools", headers=bearer)).status_code == 200
        for path in ("/healthz", "/metrics", "/openapi.json"):
            assert (await client.get(path)).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("GET", "/nope", None, 404, "not_found"),
        ("GET", "/v1/admissions", None, 405, "method_not_allowed"),
        ("POST", "/v1/admissions", {"user": "alice"}, 422, "invalid_request"),
        ("POST", "/v1/admissions", "{not json", 422, "invalid_request"),
        ("POST", "/v1/admissions", {**_admission("a", "python-cpu", []), "kernel_id": "../x"},
         422, "invalid_request"),
        ("DELETE", "/v1/leases/bad%20id", None, 422, "invalid_request"),
    ],
)  # fmt: skip
async def test_errors_have_one_shape(
    client: httpx.AsyncClient, method: str, path: str, body: object, status: int, code: str
) -> None:
    content = body if isinstance(body, str) else None
    json = body if not isinstance(body, str) else None
    response = await client.request(method, path, json=json, content=content)
    assert response.status_code == status
    assert set(response.json()) == {"error", "message"}
    assert response.json()["error"] == code
    assert "Traceback" not in response.text


async def test_admit_refuse_release_over_http(client: httpx.AsyncClient) -> None:
    ids = []
    for _ in range(3):
        response = await client.post("/v1/admissions", json=_admission("alice", "python-cpu", []))
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["decision"] == "admitted" and body["env"] == {"CUDA_VISIBLE_DEVICES": ""}
        lease = body["lease"]
        assert set(lease) == {
            "kernel_id", "user", "kernelspec", "pool", "cpus", "memory", "gpus",
            "gpu_devices", "state", "created", "last_activity", "connections", "waited",
            "stopped", "stop_reason",
        }  # fmt: skip
        assert (lease["pool"], lease["memory"], lease["state"]) == ("cpu", 2 * GIB, "starting")
        ids.append(lease["kernel_id"])
    refused = await client.post("/v1/admissions", json=_admission("alice", "python-cpu", []))
    assert refused.status_code == 403
    assert refused.json() == {
        "error": "quota_exceeded",
        "message": "You already have 3 of 3 kernels running. Shut one down from the Running panel.",
    }
    again = await client.post("/v1/admissions", json=_admission("alice", "python-cpu", []))
    assert again.status_code == 403
    assert (await client.delete(f"/v1/leases/{ids[0]}")).json() == {"released": True}
    assert (await client.delete(f"/v1/leases/{ids[0]}")).json() == {"released": False}
    ok = await client.post("/v1/admissions", json=_admission("alice", "python-cpu", []))
    assert ok.status_code == 201


async def test_gpu_quota_and_full_pool_over_http(client: httpx.AsyncClient) -> None:
    carol = await client.post("/v1/admissions", json=_admission("carol", "python-gpu", ["ml"]))
    assert carol.status_code == 201
    device = carol.json()["lease"]["gpu_devices"]
    assert carol.json()["env"] == {"CUDA_VISIBLE_DEVICES": str(device[0])}
    quota = await client.post("/v1/admissions", json=_admission("carol", "python-gpu", ["ml"]))
    assert (quota.status_code, quota.json()) == (403, {
        "error": "quota_exceeded",
        "message": "GPU quota: 1 of 1 GPUs in use by you. Shut down a GPU kernel first.",
    })  # fmt: skip
    dave = await client.post("/v1/admissions", json=_admission("dave", "python-gpu", ["ml"]))
    assert dave.json()["lease"]["gpu_devices"] != device
    full = await client.post("/v1/admissions", json=_admission("erin", "python-gpu", ["ml"]))
    assert (full.status_code, full.json()) == (409, {
        "error": "pool_full",
        "message": "All 2 GPUs in pool gpu are in use. Try again later, or pick python-cpu.",
    })  # fmt: skip


async def test_unknown_and_forbidden_kernelspecs(client: httpx.AsyncClient) -> None:
    unknown = await client.post("/v1/admissions", json=_admission("alice", "julia", []))
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_kernelspec"
    assert "'julia'" in unknown.json()["message"]
    forbidden = await client.post("/v1/admissions", json=_admission("bob", "python-gpu", []))
    assert forbidden.status_code == 403 and forbidden.json()["error"] == "kernelspec_forbidden"
    admin = _admission("ops", "python-gpu", [], admin=True)
    assert (await client.post("/v1/admissions", json=admin)).status_code == 201


async def test_lists_leases_and_pools(client: httpx.AsyncClient) -> None:
    await client.post("/v1/admissions", json=_admission("alice", "python-cpu", []))
    await client.post("/v1/admissions", json=_admission("alice", "python-cpu-large", ["analysts"]))
    await client.post("/v1/admissions", json=_admission("carol", "python-gpu", ["ml"]))

    async def listed(**params: str) -> list[tuple[str, str]]:
        response = await client.get("/v1/leases", params=params)
        return [(x["user"], x["kernelspec"]) for x in response.json()["leases"]]

    assert len(await listed()) == 3
    assert await listed(user="alice", kernelspec="python-cpu-large") == [
        ("alice", "python-cpu-large")
    ]
    assert await listed(pool="gpu") == [("carol", "python-gpu")]
    assert await listed(user="carol", pool="cpu") == []
    pools = {p["name"]: p for p in (await client.get("/v1/pools")).json()["pools"]}
    assert pools["gpu"]["capacity"] == {"cpus": 16, "memory": 64 * GIB, "gpus": 2}
    assert pools["gpu"]["used"] == {"cpus": 1, "memory": 4 * GIB, "gpus": 1}
    assert pools["gpu"]["simulated_gpus"] is True and pools["gpu"]["cost_per_hour"] == 2.5
    assert pools["cpu"]["used"] == {"cpus": 3, "memory": 10 * GIB, "gpus": 0}
    assert pools["cpu"]["simulated_gpus"] is False and pools["cpu"]["kernels"] == 2


async def test_metrics_and_openapi(client: httpx.AsyncClient) -> None:
    await client.post("/v1/admissions", json=_admission("carol", "python-gpu", ["ml"]))
    await client.post("/v1/admissions", json=_admission("carol", "python-gpu", ["ml"]))
    text = (await client.get("/metrics")).text
    assert 'kernelfleet_scheduler_admissions_total{decision="admitted",reason="new"} 1.0' in text
    assert (
        'kernelfleet_scheduler_admissions_total{decision="refused",reason="quota_exceeded"} 1.0'
        in text
    )
    assert 'kernelfleet_scheduler_leases{pool="gpu",state="starting"} 1.0' in text
    assert 'kernelfleet_scheduler_pool_used{pool="gpu",resource="gpus"} 1.0' in text
    assert "kernelfleet_scheduler_redis_up 1.0" in text
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert {"/v1/admissions", "/v1/leases", "/v1/leases/{kernel_id}", "/v1/pools"} <= set(paths)


async def test_healthz_503_while_redis_is_down_then_recovers(
    make_scheduler: MakeScheduler, tmp_path: Path
) -> None:
    with running_redis(tmp_path / "redis") as server:
        async with _client(_demo_scheduler(make_scheduler, url=server.url)) as client:
            assert (await client.get("/healthz")).json() == {"status": "ok", "redis": "ok"}
            server.stop()
            down = await client.get("/healthz")
            assert down.status_code == 503
            assert down.json()["error"] == "redis_unavailable"
            assert down.json()["message"].startswith(
                f"Redis at 127.0.0.1:{server.port} is unreachable;"
            )
            refused = await client.post("/v1/admissions", json=_admission("a", "python-cpu", []))
            assert refused.status_code == 503 and refused.json()["error"] == "redis_unavailable"
            assert "redis_up 0.0" in (await client.get("/metrics")).text
            server.start()
            assert (await client.get("/healthz")).status_code == 200
            admitted = await client.post("/v1/admissions", json=_admission("a", "python-cpu", []))
            assert admitted.status_code == 201


async def test_unexpected_failures_answer_500_without_a_trace(
    demo: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken() -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(demo, "pool_status", broken)
    app = create_app(demo, token=TOKEN, metrics=SchedulerMetrics())
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://s", headers=AUTH) as c:
        response = await c.get("/v1/pools")
    assert response.status_code == 500
    assert response.json()["error"] == "internal_error"
    assert "secret internals" not in response.text
