"""N simulated users at once: log in, get a server, start a kernel, run a cell.

Each simulated user is a browser-like session (:class:`tests.e2e.stack.HubUser`: the login
form, cookies, xsrf) doing what a person does first thing in the morning, all N at the same
moment: log in, spawn their server and load JupyterLab, start a kernel, open its channels
websocket (offering JupyterLab's v1 protocol) and run ``1+1``. Per user the bench records
how long each step took and the time from the start of the login to the ``2``; a user
succeeds when the ``2`` arrives within the deadline.

Run against kernelfleet (``kernelfleet up``, python-cpu kernels through the gateway) and,
for comparison, against a stock JupyterHub (:mod:`bench.stock_hub`: local kernels). The
hub's spawn time is the time from ``GET /hub/spawn`` until JupyterLab's page answers.
Kernels stay up until every user is done (the load is that of N live users), then every
kernel and server is stopped.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.stack import HubUser, Stack

from .chains import BENCH_KERNEL, KERNELFLEET_KERNEL, HubEndpoint, WebsocketChain, bench_users
from .context import Context
from .kernels import Kernel
from .runtime import progress
from .stats import summarize
from .stock_hub import hub_log_path, running_stock_hub

STEPS = ("login", "spawn", "kernel_start", "first_result")
#: Seconds without a progress event after which the spawn's state is read from the hub API.
QUIET_S = 10.0
#: Hub log lines kept per failed user (its warnings and errors that name the user).
LOG_LINES_KEPT = 4
STOCK_NOTE = (
    "JupyterHub 6.1.1 + the same CHP, SimpleLocalProcessSpawner, jupyterhub-singleuser "
    "(JupyterLab 4) without gateway.client: local kernels from the same ipykernel; "
    "DummyAuthenticator (no password hashing); the same spawner timeouts as "
    "kernelfleet's"
)


@dataclass
class Journey:
    """One simulated user's morning: step durations, or where and why it failed."""

    name: str
    steps: dict[str, float] = field(default_factory=dict)
    total_s: float | None = None
    failed: str | None = None


async def _login(user: HubUser) -> None:
    page = await user.login()
    if not any(c.name.startswith("jupyterhub-session") for c in user.http.cookies.jar):
        raise RuntimeError(f"login refused ({page.status_code} {page.url.path})")


async def stop_server(user: HubUser, *, timeout: float = 30) -> None:
    """Stop ``user``'s server as they would from the hub's home page, and wait until gone."""
    xsrf = {"X-XSRFToken": user.http.cookies.get("_xsrf", path="/hub/") or ""}
    path = f"/hub/api/users/{user.name}"
    await user.http.delete(f"{path}/server", headers=xsrf)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        model = await user.http.get(path, headers=xsrf)
        if model.status_code != 200 or not model.json().get("servers"):
            return
        await asyncio.sleep(0.5)


async def spawn(user: HubUser, *, timeout: float) -> None:
    """Spawn ``user``'s server the way the hub's spawn page does: ``GET /hub/spawn``, then
    follow the progress event stream until ready (no polling), then load JupyterLab (the
    OAuth dance gives the session the server's cookies). Should the stream fall silent for
    :data:`QUIET_S`, the hub's user model is asked whether the server is ready meanwhile."""
    await user.http.get(f"/hub/spawn/{user.name}", follow_redirects=False)
    xsrf = {"X-XSRFToken": user.http.cookies.get("_xsrf", path="/hub/") or ""}
    progress_url = f"/hub/api/users/{user.name}/server/progress"
    async with user.http.stream("GET", progress_url, headers=xsrf, timeout=timeout) as events:
        if events.status_code != 200:
            raise RuntimeError(f"progress stream answered {events.status_code}")
        reader = asyncio.ensure_future(_ready_event(events.aiter_lines()))
        try:
            while not await _ready(user, reader, xsrf):
                pass
        finally:
            reader.cancel()
    page = await user.http.get(f"{user.server}/lab", follow_redirects=True)
    if page.status_code != 200 or not page.url.path.startswith(f"{user.server}/lab"):
        raise RuntimeError(f"JupyterLab answered {page.status_code} at {page.url.path}")


async def _ready_event(lines: AsyncIterator[str]) -> bool:
    """True at the progress stream's ready event; raises at a failed one; False if it ends."""
    async for line in lines:
        event = json.loads(line[5:]) if line.startswith("data:") else {}
        if event.get("failed"):
            raise RuntimeError(f"spawn failed: {event.get('message', '')[:200]}")
        if event.get("ready"):
            return True
    return False


async def _ready(user: HubUser, reader: asyncio.Future[bool], xsrf: dict[str, str]) -> bool:
    """Whether the server is ready: the stream said so, or, when it was quiet for
    :data:`QUIET_S` (or ended), the hub's user model says so."""
    if not reader.done():
        await asyncio.wait({reader}, timeout=QUIET_S)
    if reader.done() and reader.result():
        return True
    if reader.done():  # ended without a word: poll, but not in a tight loop
        await asyncio.sleep(1)
    model = await user.http.get(f"/hub/api/users/{user.name}", headers=xsrf)
    server = (model.json().get("servers") or {}).get("", {}) if model.is_success else {}
    return bool(server.get("ready"))


async def _morning(user: HubUser, kernel_name: str, journey: Journey, timeout: float,
                   kernels: list[tuple[WebsocketChain, Kernel]]) -> None:  # fmt: skip
    """Run one user's steps into ``journey``; raises on the first failure."""
    began = last = time.perf_counter()

    def done(step: str) -> None:
        nonlocal last
        now = time.perf_counter()
        journey.steps[step] = now - last
        last = now

    await _login(user)
    done("login")
    await spawn(user, timeout=timeout)
    done("spawn")
    chain = WebsocketChain("users", HubEndpoint(user), kernel_name)
    _, kernel = await chain.start_kernel(timeout=timeout)
    kernels.append((chain, kernel))
    done("kernel_start")
    result = await kernel.execute("1+1", timeout=timeout)
    if result.result != "2":
        raise RuntimeError(f"1+1 gave {result.status} {result.result!r} {result.error}")
    done("first_result")
    journey.total_s = time.perf_counter() - began


async def crowd(stack: Stack, names: list[str], kernel_name: str, *, timeout: float,
                hub_log: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """All of ``names`` at once on ``stack``; success rate, step and total summaries, and
    for each user who failed what ``hub_log`` says of them (the hub's own word on a failed
    spawn: its progress stream may say no more than "Spawn failed")."""
    users = [HubUser(stack, name) for name in names]
    for user in users:  # a browser waits minutes for a busy hub; HubUser's default is 60 s
        user.http.timeout = httpx.Timeout(timeout)
    journeys = [Journey(name) for name in names]
    kernels: list[tuple[WebsocketChain, Kernel]] = []

    async def one(user: HubUser, journey: Journey) -> None:
        try:
            await asyncio.wait_for(_morning(user, kernel_name, journey, timeout, kernels),
                                   timeout)  # fmt: skip
        except Exception as e:  # every failure is a result, not a crash
            step = next((s for s in STEPS if s not in journey.steps), "?")
            journey.failed = f"{step}: {type(e).__name__}: {str(e)[:160]}"

    try:
        await asyncio.gather(*(one(u, j) for u, j in zip(users, journeys, strict=True)))
    finally:
        await _tidy(users, kernels)
    summary = _summary(journeys)
    failed = [j.name for j in journeys if j.failed]
    if failed and hub_log is not None:
        summary["failure_logs"] = hub_log_lines(hub_log, failed[:5])
    return summary


def hub_log_lines(log: Path, users: list[str]) -> dict[str, list[str]]:
    """The first :data:`LOG_LINES_KEPT` warning and error lines of the hub's log (JupyterHub's
    ``[W ...]`` / ``[E ...]``) that name each of ``users``: the cause comes first, the
    clean-up after it. The hub's warning for every request without an xsrf check (the bench's
    API calls) is left out."""
    try:
        text = log.read_text(errors="replace")
    except OSError as e:
        return {user: [f"hub log unreadable: {e}"] for user in users}
    found: dict[str, list[str]] = {}
    for user in users:
        named = re.compile(rf"\b{re.escape(user)}\b")
        lines = [line[:300] for line in text.splitlines()
                 if line.startswith(("[W ", "[E ", "[C ")) and named.search(line)
                 and "Skipping XSRF check" not in line]  # fmt: skip
        found[user] = lines[:LOG_LINES_KEPT]
    return found


async def _tidy(users: list[HubUser], kernels: list[tuple[WebsocketChain, Kernel]]) -> None:
    """Stop every kernel and server the crowd started (failures only logged)."""
    for chain, kernel in kernels:
        try:
            await asyncio.wait_for(chain.stop_kernel(kernel), 30)
        except Exception as e:
            progress(f"users: stopping a kernel failed: {e!r}")
    results = await asyncio.gather(*(stop_server(u) for u in users), return_exceptions=True)
    for user, result in zip(users, results, strict=True):
        if isinstance(result, BaseException):
            progress(f"users: stopping {user.name}'s server failed: {result!r}")
    for user in users:
        await user.close()


def _summary(journeys: list[Journey]) -> dict[str, Any]:
    ok = [j for j in journeys if j.failed is None and j.total_s is not None]
    summary: dict[str, Any] = {
        "users": len(journeys),
        "succeeded": len(ok),
        "success_rate": round(len(ok) / len(journeys), 4) if journeys else None,
        "login_to_first_result": summarize([j.total_s for j in ok if j.total_s is not None]),
    }
    for step in STEPS:
        summary[step] = summarize([j.steps[step] for j in journeys if step in j.steps])
    summary["failures"] = dict(Counter(j.failed.split(":")[0] for j in journeys if j.failed))
    summary["failure_examples"] = [j.failed for j in journeys if j.failed][:5]
    return summary


async def run(ctx: Context, results: dict[str, Any]) -> None:
    """kernelfleet first, then the stock hub, each with ``ctx.users`` simulated users."""
    names = bench_users(ctx.users)
    # each crowd (kernelfleet, then stock) gets half of what is left of the phase
    timeout = max(30.0, (ctx.phase_remaining() - 90) / 2)
    results["stock_is"] = STOCK_NOTE
    stack = await ctx.chains.kernelfleet()
    progress(f"users: {len(names)} users at once on kernelfleet")
    results["kernelfleet"] = await crowd(stack, names, KERNELFLEET_KERNEL, timeout=timeout,
                                         hub_log=stack.log_path("hub"))  # fmt: skip
    progress(f"users: kernelfleet {results['kernelfleet']['succeeded']}/{len(names)} ok; "
             f"now the stock hub")  # fmt: skip
    stock_dir = ctx.workdir / "stock-hub"
    async with running_stock_hub(stock_dir, users=names,
                                 jupyter_path=ctx.chains.kernel_dir) as stock:  # fmt: skip
        results["stock"] = await crowd(stock, names, BENCH_KERNEL, timeout=timeout,
                                       hub_log=hub_log_path(stock_dir))  # fmt: skip
    progress(f"users: stock {results['stock']['succeeded']}/{len(names)} ok")
