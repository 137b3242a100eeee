"""Interactive latency through each chain: kernel start, message round trip, big outputs.

Figures, for every chain of :mod:`bench.chains`:

- ``cold_start``: ``POST /api/kernels`` (raw: ``start_kernel()``) until the first
  ``kernel_info_reply`` on a freshly opened channels websocket (raw: ZMQ shell socket);
  one unrecorded start per chain first, so servers' one-time set-up is not counted;
- ``warm_start`` (kernelfleet only): the same, claiming a warm kernel: the kernelspec's warm
  target is pinned to :data:`WARM_TARGET` and every sample waits until the pool is full
  again and checks that the kernel it got was one of the warm ones (a cold start would not
  count); the target is reset afterwards, before the message figures. During the cold
  starts kernelfleet's target is pinned to 0, so none of them is a claim;
- ``round_trip``: ``1+1`` executed one after another, request sent until reply *and*
  ``idle`` arrived; ``per_s`` is round trips per second of wall time;
- ``output_1mb``: ``print`` of 1 MiB, until all of it arrived;
- ``stream_10k``: 10,000 ``print`` calls (10,000 lines), until all arrived.

Chains are measured interleaved (a slice of each figure per chain, in rounds), so a burst of
load on this shared machine hits every chain alike instead of skewing one of them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from .chains import CHAIN_LABELS, KERNELFLEET_KERNEL, Chain
from .context import Context
from .kernels import Kernel
from .machine import cpu_share, cpu_ticks
from .runtime import progress
from .stats import summarize

WARM_POOLS_NOTE = "n/a (no warm pools)"
WARM_TARGET = 2
ONE_MB = 1 << 20
BIG_OUTPUT = f"print('x' * {ONE_MB - 1})"
LINES = 10_000
STREAM = f"for i in range({LINES}): print(i)"
OP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Plan:
    """How many samples of each figure to take."""

    starts: int
    round_trips: int
    outputs: int
    rounds: int
    warmup: int = 20

    @classmethod
    def for_run(cls, quick: bool) -> Plan:
        """A plan for a quick development run, or the full one of the issue."""
        if quick:
            return cls(starts=3, round_trips=200, outputs=2, rounds=2, warmup=10)
        return cls(starts=10, round_trips=1000, outputs=5, rounds=5)


async def _cold_starts(chain: Chain, count: int, samples: list[float]) -> None:
    for _ in range(count):
        seconds, kernel = await chain.start_kernel(timeout=OP_TIMEOUT_S)
        samples.append(seconds)
        await chain.stop_kernel(kernel)


@asynccontextmanager
async def _warm_target(ctx: Context, target: int) -> AsyncIterator[httpx.AsyncClient]:
    """kernelfleet's latency kernelspec with its warm target pinned to ``target`` and that
    many warm kernels ready; back to the spec's own target after the block."""
    stack = await ctx.chains.kernelfleet()
    auth = {"Authorization": f"token {stack.secret('scheduler_token')}"}
    path = f"/v1/warm-pools/{KERNELFLEET_KERNEL}"
    async with httpx.AsyncClient(base_url=stack.scheduler_url, headers=auth, timeout=30) as ops:
        (await ops.put(path, json={"target": target})).raise_for_status()
        try:
            await _warm_ready(ops, target)
            yield ops
        finally:
            await ops.delete(path)


async def _warm_ready(ops: httpx.AsyncClient, target: int) -> set[str]:
    """Wait until exactly ``target`` warm kernels are ready (idle); their ids."""
    params = {"user": "@warm", "kernelspec": KERNELFLEET_KERNEL}
    async with asyncio.timeout(OP_TIMEOUT_S):
        while True:
            leases = (await ops.get("/v1/leases", params=params)).json()["leases"]
            ready = {lease["kernel_id"] for lease in leases if lease["state"] == "idle"}
            if len(ready) == len(leases) == target:
                await asyncio.sleep(0.5)  # the refill's CPU burst has passed
                return ready
            await asyncio.sleep(0.1)


async def _warm_starts(ctx: Context, chain: Chain, count: int, samples: list[float]) -> None:
    """Starts that claim a warm kernel, each from a full pool (see the module docstring)."""
    async with _warm_target(ctx, WARM_TARGET) as ops:
        for _ in range(count):
            ready = await _warm_ready(ops, WARM_TARGET)
            seconds, kernel = await chain.start_kernel(timeout=OP_TIMEOUT_S)
            await chain.stop_kernel(kernel)
            if kernel.kernel_id not in ready:
                raise RuntimeError(f"warm start got kernel {kernel.kernel_id}, not a warm one")
            samples.append(seconds)


async def _round_trips(kernel: Kernel, count: int, samples: list[float]) -> None:
    for _ in range(count):
        began = time.perf_counter()
        done = await kernel.execute("1+1", timeout=OP_TIMEOUT_S)
        samples.append(time.perf_counter() - began)
        if done.status != "ok" or done.result != "2":
            raise RuntimeError(f"1+1 gave {done.status} {done.result!r} {done.error}")


async def _timed_output(kernel: Kernel, code: str, check: str, samples: list[float]) -> None:
    began = time.perf_counter()
    done = await kernel.execute(code, timeout=OP_TIMEOUT_S)
    samples.append(time.perf_counter() - began)
    if check == "bytes" and len(done.stdout) != ONE_MB:
        raise RuntimeError(f"1 MiB output arrived as {len(done.stdout)} characters")
    if check == "lines" and done.stdout.count("\n") != LINES:
        raise RuntimeError(f"{LINES} lines arrived as {done.stdout.count(chr(10))}")


class Samples:
    """Raw samples per chain and figure, summarized into the phase's results as they come."""

    FIGURES = ("cold_start", "warm_start", "round_trip", "output_1mb", "stream_10k")

    def __init__(self, keys: list[str], results: dict[str, Any]) -> None:
        self.raw: dict[str, dict[str, list[float]]] = {
            key: {figure: [] for figure in self.FIGURES} for key in keys
        }
        self.wall = {key: 0.0 for key in keys}
        self.results = results
        results["chains"] = {key: {"label": CHAIN_LABELS[key], "warm_start": WARM_POOLS_NOTE}
                             for key in keys}  # fmt: skip

    def publish(self, key: str) -> None:
        """Refresh ``key``'s summaries in the results (so a timeout keeps what was measured)."""
        entry = self.results["chains"][key]
        for figure, samples in self.raw[key].items():
            if samples:
                wall = self.wall[key] if figure == "round_trip" else None
                entry[figure] = summarize(samples, wall_s=wall)


async def run(ctx: Context, results: dict[str, Any]) -> None:
    """Measure every chain of ``ctx.chain_keys``; results go into ``results`` as they come."""
    plan = Plan.for_run(ctx.quick)
    results["plan"] = plan.__dict__
    started = {key: await ctx.chains.get(key) for key in ctx.chain_keys}
    samples = Samples(list(started), results)
    kernels: dict[str, Kernel] = {}
    try:
        progress("latency: warm-up start per chain, then cold starts")
        async with AsyncExitStack() as cold:
            if "kernelfleet" in started:  # no warm kernel to claim: these starts are cold
                await cold.enter_async_context(_warm_target(ctx, 0))
            for key, chain in started.items():
                _, kernels[key] = await chain.start_kernel(timeout=OP_TIMEOUT_S)
            per_round = max(1, plan.starts // plan.rounds)
            for _ in range(plan.rounds):
                for key, chain in started.items():
                    await _cold_starts(chain, per_round, samples.raw[key]["cold_start"])
                    samples.publish(key)
        if "kernelfleet" in started:
            progress(f"latency: {plan.starts} warm starts on kernelfleet")
            warm = samples.raw["kernelfleet"]["warm_start"]
            await _warm_starts(ctx, started["kernelfleet"], plan.starts, warm)
            samples.publish("kernelfleet")
        await _messages(kernels, samples, plan)
    finally:
        for key, kernel in kernels.items():
            try:
                await started[key].stop_kernel(kernel)
            except Exception as e:  # one stuck kernel must not keep the others running
                progress(f"latency: stopping the {key} kernel failed: {e!r}")


async def _messages(kernels: dict[str, Kernel], samples: Samples, plan: Plan) -> None:
    """Round trips and big outputs, interleaved across chains in ``plan.rounds`` rounds."""
    for kernel in kernels.values():
        await _round_trips(kernel, plan.warmup, [])
    per_round = max(1, plan.round_trips // plan.rounds)
    progress(f"latency: {plan.round_trips} round trips per chain in {plan.rounds} rounds")
    ticks = cpu_ticks()
    for _ in range(plan.rounds):
        for key, kernel in kernels.items():
            began = time.perf_counter()
            await _round_trips(kernel, per_round, samples.raw[key]["round_trip"])
            samples.wall[key] += time.perf_counter() - began
            samples.publish(key)
    # a VM whose neighbours are busy runs every hop slower: the chain more than raw ZMQ
    samples.results["round_trip_machine"] = cpu_share(ticks, cpu_ticks())
    progress("latency: 1 MiB outputs and 10,000-line streams")
    for _ in range(plan.outputs):
        for key, kernel in kernels.items():
            await _timed_output(kernel, BIG_OUTPUT, "bytes", samples.raw[key]["output_1mb"])
            await _timed_output(kernel, STREAM, "lines", samples.raw[key]["stream_10k"])
            samples.publish(key)
