"""gateway.server.scheduler: admissions, refusals passed on verbatim, releases that never raise."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from gateway.server.errors import GatewayError
from gateway.server.scheduler import SCHEDULER_UNREACHABLE, SchedulerClient

QUOTA = "You already have 3 of 3 kernels running. Shut one down from the Running panel."


def client(handler) -> SchedulerClient:
    return SchedulerClient("http://scheduler/", "s3cret", transport=httpx.MockTransport(handler))


async def admit(c: SchedulerClient) -> dict[str, str]:
    return await c.admit(kernel_id="k1", user="alice", groups=["ml"], kernelspec="python-gpu")


async def test_admission_sends_the_contract_body_and_returns_env() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        env = {"CUDA_VISIBLE_DEVICES": "1"}
        return httpx.Response(201, json={"decision": "admitted", "lease": {}, "env": env})

    c = client(handler)
    assert await admit(c) == {"CUDA_VISIBLE_DEVICES": "1"}
    assert seen[0].url == "http://scheduler/v1/admissions"
    assert seen[0].headers["Authorization"] == "token s3cret"
    assert json.loads(seen[0].content) == {
        "kernel_id": "k1",
        "user": "alice",
        "groups": ["ml"],
        "kernelspec": "python-gpu",
        "admin": False,
    }
    await c.aclose()


@pytest.mark.parametrize(
    ("status", "body", "expected_status", "expected_message"),
    [
        (403, {"error": "quota_exceeded", "message": QUOTA}, 403, QUOTA),
        (409, {"error": "pool_full", "message": "All 2 GPUs in use."}, 409, "All 2 GPUs in use."),
        (503, {"error": "redis_unavailable", "message": "Redis is down."}, 503, "Redis is down."),
        (401, {"error": "unauthorized", "message": "no token"}, 503, SCHEDULER_UNREACHABLE),
        (502, None, 503, SCHEDULER_UNREACHABLE),
        (200, {"decision": "queued"}, 503, SCHEDULER_UNREACHABLE),
    ],
)
async def test_refusals_reach_the_user_verbatim(
    status: int, body: dict | None, expected_status: int, expected_message: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if body is None:
            return httpx.Response(status, text="<html>bad gateway</html>")
        return httpx.Response(status, json=body)

    c = client(handler)
    with pytest.raises(GatewayError) as info:
        await admit(c)
    assert (info.value.status_code, info.value.message) == (expected_status, expected_message)
    await c.aclose()


async def test_unreachable_scheduler_is_503_with_the_documented_message() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    c = client(handler)
    with pytest.raises(GatewayError) as info:
        await admit(c)
    assert info.value.status_code == 503
    assert info.value.message == (
        "The kernelfleet scheduler is unreachable; kernels cannot start right now. "
        "Try again in a minute."
    )
    await c.aclose()


async def test_release_deletes_the_lease_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    deleted: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/down"):
            raise httpx.ConnectError("refused", request=request)
        deleted.append(request.url.path)
        return httpx.Response(200, json={"released": True})

    c = client(handler)
    await c.release("k1")
    assert deleted == ["/v1/leases/k1"]
    with caplog.at_level(logging.WARNING, logger="kernelfleet.gateway"):
        await c.release("down")
    assert "down" in caplog.text and "s3cret" not in caplog.text
    await c.aclose()


async def test_start_failures_are_read_and_their_absence_is_none() -> None:
    why = "Kernel python-gpu could not start: no node of pool gpu had room for it within 30 s."

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == "token s3cret"
        kernel_id = request.url.path.rsplit("/", 1)[-1]
        if request.url.path.startswith("/v1/start-failures/") and kernel_id == "k1":
            body = {"kernel_id": "k1", "kernelspec": "python-gpu", "reason": "pending_timeout",
                    "message": why, "at": "1763900000.0"}  # fmt: skip
            return httpx.Response(200, json=body)
        if kernel_id == "down":
            raise httpx.ConnectError("refused")
        return httpx.Response(404, json={"error": "unknown_start_failure", "message": "none"})

    c = client(handler)
    found = await c.start_failure("k1")
    assert found is not None and (found.reason, found.message) == ("pending_timeout", why)
    assert await c.start_failure("k2") is None  # nothing recorded, or not Kubernetes
    assert await c.start_failure("down") is None  # never raises
    await c.aclose()
