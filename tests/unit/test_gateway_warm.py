"""The warm claim's personalisation (the code it runs in the kernel, and how its reply is
read), and what a kernel out for a claim is while the scheduler decides."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from gateway.server.activity import DEAD, ActivityReporter, KernelActivity
from gateway.server.identity import Identity
from gateway.server.warm import CHECKS, WarmKernel, WarmPool, personalise_code, personalised


def test_values_cannot_change_the_code_around_them(tmp_path: Path) -> None:
    hostile = {
        "KERNEL_USERNAME": "alice",
        "KERNEL_NOTE": "x'); import os; os.environ['PWNED'] = '1'; ('",
        "KERNEL_LINES": 'two\nlines "and" quotes \\ backslash',
    }
    code = personalise_code(hostile, str(tmp_path))
    report = "import json, os; print(json.dumps({k: os.environ.get(k) for k in %r}))" % (
        [*hostile, "PWNED", "KERNEL_WARM"]
    )
    result = subprocess.run(
        [sys.executable, "-c", code + report], capture_output=True, text=True, check=True,
        env={"KERNEL_WARM": "true", "PATH": "/usr/bin:/bin"}, cwd="/",
    )  # fmt: skip
    seen = json.loads(result.stdout)
    assert {k: seen[k] for k in hostile} == hostile  # every value arrives exactly
    assert seen["PWNED"] is None and seen["KERNEL_WARM"] is None  # no injection; not warm


def reply(status: str = "ok", **values: str) -> dict:
    found = {name: {"status": "ok", "data": {"text/plain": text}} for name, text in values.items()}
    return {"content": {"status": status, "user_expressions": found}}


def test_only_a_reply_showing_the_users_name_home_and_cwd_counts() -> None:
    home = "/homes/alice"
    good = {"user": "'alice'", "home": repr(home), "cwd": repr(home), "warm": "None"}
    assert set(good) == set(CHECKS)
    assert personalised(reply(**good), user="alice", home=home) is None
    assert "cwd" in personalised(reply(**{**good, "cwd": "'/'"}), user="alice", home=home)
    assert "user" in personalised(reply(**{**good, "user": "'bob'"}), user="alice", home=home)
    assert "warm" in personalised(reply(**{**good, "warm": "'true'"}), user="alice", home=home)
    failed = {"content": {"status": "error", "ename": "OSError", "evalue": "no such dir"}}
    assert "OSError" in personalised(failed, user="alice", home=home)


class _Manager:
    """What a claim uses of the kernel manager. The scheduler's answer to the claim waits
    until the test sets ``answer``; the kernel answers the personalisation at once."""

    def __init__(self, home: Path) -> None:
        self.answer = asyncio.Event()
        self.asked = asyncio.Event()
        self.abandoned = asyncio.Event()
        self.owners: dict[str, str] = {}
        self.home = home
        self.scheduler = self.compliance = self

    async def claim_warm(self, **_: Any) -> dict[str, str]:  # the scheduler
        self.asked.set()
        await self.answer.wait()
        return {"CUDA_VISIBLE_DEVICES": ""}

    async def prepare_secrets(self, *_: Any) -> None:  # compliance
        return None

    def take_secret_env(self, kernel_id: str) -> dict[str, str]:
        return {}

    def adopt(self, kernel_id: str, user: str) -> None:
        self.owners[kernel_id] = user

    def owner_of(self, kernel_id: str) -> str | None:
        return self.owners.get(kernel_id)

    def personalised(self, kernel_id: str, **_: Any) -> None:
        return None

    async def abandon_claim(self, kernel_id: str) -> None:
        self.abandoned.set()

    async def execute(self, *_: Any, **__: Any) -> dict:  # the warm kernel's client
        home = repr(str(self.home))
        return reply(user="'alice'", home=home, cwd=home, warm="None")


def _claimed_later(tmp_path: Path) -> tuple[_Manager, WarmPool, asyncio.Future]:
    manager = _Manager(tmp_path / "alice")
    pool = WarmPool(manager, interval_s=60)  # type: ignore[arg-type]
    warm = WarmKernel(kernel_id="k1", kernel_name="python-cpu", client=manager, ready_at=0.0,
                      env={"CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
    pool.ready["python-cpu"] = [warm]
    claim = asyncio.ensure_future(
        pool.claim(
            Identity("alice"), kernel_name="python-cpu", spec=None, env={}, home=str(manager.home)
        )  # fmt: skip
    )
    return manager, pool, claim


async def test_a_kernel_out_for_a_claim_stays_warm_until_its_user_has_it(tmp_path: Path) -> None:
    manager, pool, claim = _claimed_later(tmp_path)
    await manager.asked.wait()
    # taken from the pool, not yet anybody's: users and admins do not see it among the
    # kernels; it is listed with the warm ones (the scheduler's reconciliation)
    assert pool.is_warm("k1") and not pool.ready["python-cpu"]
    manager.answer.set()
    assert await claim == "k1"
    assert manager.owner_of("k1") == "alice" and not pool.is_warm("k1")


async def test_a_kernel_that_dies_while_out_for_a_claim_gives_its_lease_back(
    tmp_path: Path,
) -> None:
    manager, pool, claim = _claimed_later(tmp_path)
    await manager.asked.wait()
    assert await pool.forget("k1")  # the manager releases the lease of what was warm
    assert not pool.is_warm("k1")
    claim.cancel()  # the user's request went away with it
    await asyncio.gather(claim, return_exceptions=True)
    await asyncio.wait_for(manager.abandoned.wait(), 5)


async def test_a_kernel_out_for_a_claim_is_never_reported_dead(tmp_path: Path) -> None:
    # Found by CI: the activity flush that fell inside a claim left the kernel out, the
    # scheduler released the lease the claim had just moved to bob ("died"), and bob's
    # quota let him start a fourth kernel.
    manager, pool, claim = _claimed_later(tmp_path)
    sent: list[dict[str, object]] = []

    async def send(reports: list[dict[str, object]]) -> bool:
        sent.extend(reports)
        return True

    def snapshot() -> dict[str, KernelActivity]:  # as the gateway's kernel manager takes it
        return {k: KernelActivity("idle", 0.0, 0) for k in [*manager.owners, *pool.kernel_ids()]}

    reporter = ActivityReporter(snapshot, send)
    await reporter.flush()
    await manager.asked.wait()  # out for the claim: the scheduler is deciding
    await reporter.flush()
    manager.answer.set()
    assert await claim == "k1"
    await reporter.flush()
    assert {r["kernel_id"] for r in sent} == {"k1"}
    assert not [r for r in sent if r["execution_state"] == DEAD]
