"""The gateway's side of queueing and activity (gateway.server.scheduler, .activity).

A queued admission waits by polling the scheduler, rides out a scheduler restart, passes
refusals on verbatim, and withdraws when it gives up or is cancelled. Activity reports go
in batches: changes only, everything now and then, deaths at once, failed batches again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

import httpx
import pytest

from gateway.server import scheduler as gateway_scheduler
from gateway.server.activity import MAX_BATCH, ActivityReporter, KernelActivity
from gateway.server.errors import GatewayError
from gateway.server.scheduler import SchedulerClient

TIMEOUT = "All 2 GPUs are in use; you were 2nd in line. Try again, or pick python-cpu."
ADMITTED = {"decision": "admitted", "lease": {}, "env": {"CUDA_VISIBLE_DEVICES": "1"}}
QUEUED = {
    "decision": "queued",
    "kernel_id": "k1",
    "pool": "gpu",
    "position": 2,
    "deadline": 0,
    "message": "Waiting",
}


@pytest.fixture(autouse=True)
def no_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway_scheduler, "RETRY_S", 0.0)
    monkeypatch.setattr(gateway_scheduler, "QUEUE_GRACE_S", 0.0)


class SchedulerScript:
    """Answers the POST with 202 queued, then each GET with the next scripted answer."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.method == "POST":
            return httpx.Response(202, json=QUEUED)
        if request.method == "DELETE":
            return httpx.Response(200, json={"left_queue": True, "released": False})
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.url.path) for r in self.requests]


def client(handler: Callable[[httpx.Request], httpx.Response]) -> SchedulerClient:
    return SchedulerClient("http://scheduler", "s3cret", transport=httpx.MockTransport(handler))


async def admit(c: SchedulerClient, wait_s: float = 30.0, **extra: object) -> dict[str, str]:
    return await c.admit(
        kernel_id="k1", user="alice", groups=["ml"], kernelspec="python-gpu", wait_s=wait_s, **extra
    )  # type: ignore[arg-type]


async def test_a_queued_admission_waits_until_admitted() -> None:
    script = SchedulerScript(httpx.Response(202, json=QUEUED), httpx.Response(200, json=ADMITTED))
    c = client(script)
    assert await admit(c) == {"CUDA_VISIBLE_DEVICES": "1"}
    post, poll = script.requests[0], script.requests[1]
    assert post.url.params["wait_s"] == "30.0" and json.loads(post.content)["user"] == "alice"
    assert poll.url.path == "/v1/admissions/k1" and float(poll.url.params["wait_s"]) <= 10
    assert script.calls() == [
        ("POST", "/v1/admissions"),
        ("GET", "/v1/admissions/k1"),
        ("GET", "/v1/admissions/k1"),
    ]
    await c.aclose()


async def test_the_wait_rides_out_a_scheduler_restart() -> None:
    down = httpx.ConnectError("refused")
    redis_down = httpx.Response(503, json={"error": "redis_unavailable", "message": "down"})
    script = SchedulerScript(down, redis_down, down, httpx.Response(200, json=ADMITTED))
    c = client(script)
    assert await admit(c) == {"CUDA_VISIBLE_DEVICES": "1"}
    await c.aclose()


async def test_the_time_out_reaches_the_user_verbatim() -> None:
    script = SchedulerScript(
        httpx.Response(409, json={"error": "queue_timeout", "message": TIMEOUT})
    )
    c = client(script)
    with pytest.raises(GatewayError) as info:
        await admit(c)
    assert (info.value.status_code, info.value.message, info.value.code) == (
        409,
        TIMEOUT,
        "queue_timeout",
    )
    assert script.calls()[-1] == ("DELETE", "/v1/admissions/k1")
    await c.aclose()


async def test_the_gateway_gives_up_on_its_own_bound_and_withdraws() -> None:
    script = SchedulerScript(httpx.Response(202, json=QUEUED))  # the scheduler never decides
    c = client(script)
    with pytest.raises(GatewayError) as info:
        await admit(c, wait_s=0.05)
    assert info.value.code == "queue_timeout" and info.value.status_code == 409
    assert script.calls()[-1] == ("DELETE", "/v1/admissions/k1")
    await c.aclose()


async def test_a_client_that_gave_up_leaves_the_queue() -> None:
    script = SchedulerScript(httpx.Response(202, json=QUEUED))
    c = client(script)
    polls = iter([False, False, True])
    with pytest.raises(GatewayError) as info:
        await admit(c, client_gone=lambda: next(polls))
    assert info.value.code == "client_gone"
    assert script.calls() == [
        ("POST", "/v1/admissions"),
        ("GET", "/v1/admissions/k1"),
        ("GET", "/v1/admissions/k1"),
        ("DELETE", "/v1/admissions/k1"),
    ]
    await c.aclose()


async def test_a_cancelled_start_withdraws_its_request() -> None:
    polling = asyncio.Event()
    seen: list[tuple[str, str]] = []

    async def scheduler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path))
        if request.method == "GET":  # a long poll that is still waiting
            polling.set()
            await asyncio.sleep(30)
        return SchedulerScript()(request)

    c = SchedulerClient("http://s", "t", transport=httpx.MockTransport(scheduler))
    task = asyncio.ensure_future(admit(c))
    await asyncio.wait_for(polling.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen[-1] == ("DELETE", "/v1/admissions/k1")
    await c.aclose()


async def test_an_admission_that_does_not_wait_asks_for_no_queue() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json=ADMITTED)

    c = client(handler)
    await admit(c, wait_s=0)
    assert "wait_s" not in seen[0].url.params
    await c.aclose()


async def test_activity_reports_are_put_and_failures_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    answers = iter(
        [
            httpx.Response(200, json={}),
            httpx.Response(501),
            httpx.Response(501),
            httpx.Response(200, json={}),
        ]
    )
    bodies: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert (request.method, request.url.path) == ("PUT", "/v1/activity")
        bodies.append(json.loads(request.content))
        return next(answers)

    c = client(handler)
    report = {"kernel_id": "k1", "execution_state": "idle", "last_activity": 1.0, "connections": 0}
    with caplog.at_level(logging.INFO, logger="kernelfleet.gateway"):
        results = [await c.report_activity([report]) for _ in range(4)]
    assert results == [True, False, False, True]
    assert bodies[0] == {"kernels": [report]}
    assert caplog.text.count("not reaching the scheduler") == 1
    assert "reach the scheduler again" in caplog.text and "s3cret" not in caplog.text
    await c.aclose()


# -- the activity reporter -------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Sink:
    """Collects batches; can refuse them."""

    def __init__(self) -> None:
        self.batches: list[list[dict]] = []
        self.accept = True

    async def __call__(self, reports: list[dict]) -> bool:
        if self.accept:
            self.batches.append(reports)
        return self.accept

    def states(self, index: int = -1) -> dict[str, str]:
        return {r["kernel_id"]: r["execution_state"] for r in self.batches[index]}


def activity(state: str, last: float = 1.0, connections: int = 0) -> KernelActivity:
    return KernelActivity(execution_state=state, last_activity=last, connections=connections)


async def test_only_changes_are_sent_and_everything_now_and_then() -> None:
    kernels = {"a": activity("idle"), "b": activity("busy")}
    sink, clock = Sink(), Clock()
    reporter = ActivityReporter(lambda: dict(kernels), sink, full_every_s=30, clock=clock)
    assert await reporter.flush()
    assert sink.states() == {"a": "idle", "b": "busy"}  # the first batch is a full one
    kernels["b"] = activity("idle", last=2.0)
    await reporter.flush()
    assert sink.batches[-1] == [activity("idle", 2.0).report("b")]
    batches = len(sink.batches)
    await reporter.flush()
    assert len(sink.batches) == batches  # nothing changed, nothing sent
    clock.now += 30
    await reporter.flush()
    assert sink.states() == {"a": "idle", "b": "idle"}


async def test_deaths_and_vanished_kernels_are_reported_dead() -> None:
    kernels = {"a": activity("idle"), "b": activity("idle")}
    sink = Sink()
    reporter = ActivityReporter(lambda: dict(kernels), sink, clock=Clock())
    await reporter.flush()
    del kernels["a"]  # removed without a release
    reporter.kernel_died("c")  # died before the reporter saw it
    await reporter.flush()
    assert sink.states() == {"a": "dead", "c": "dead"}
    await reporter.flush()
    assert len(sink.batches) == 2  # each death once


async def test_a_failed_batch_is_sent_again() -> None:
    kernels = {"a": activity("busy")}
    sink = Sink()
    reporter = ActivityReporter(lambda: dict(kernels), sink, clock=Clock())
    sink.accept = False
    reporter.kernel_died("x")
    assert not await reporter.flush()
    sink.accept = True
    assert await reporter.flush()
    assert sink.states() == {"a": "busy", "x": "dead"}


async def test_large_batches_are_split() -> None:
    kernels = {f"k{n:05d}": activity("idle") for n in range(MAX_BATCH + 5)}
    sink = Sink()
    await ActivityReporter(lambda: kernels, sink, clock=Clock()).flush()
    assert [len(b) for b in sink.batches] == [MAX_BATCH, 5]


async def test_a_death_is_sent_at_once_not_at_the_next_tick() -> None:
    sink = Sink()
    reporter = ActivityReporter(dict, sink, interval_s=60, clock=Clock())
    reporter.start()
    await asyncio.sleep(0)
    reporter.kernel_died("k")
    for _ in range(100):
        if sink.batches:
            break
        await asyncio.sleep(0.01)
    assert sink.states() == {"k": "dead"}
    await reporter.stop()
