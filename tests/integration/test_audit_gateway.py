"""Audit trail and kernelspec secrets inside a real Enterprise Gateway 3.3 process.

The scheduler is the real one on the run's Redis, so a grep can show that no secret value
reaches Redis; JupyterHub's API is a stand-in. Kernelspecs are rendered from spec.yaml by
kernelfleet's own build; secrets come from the ``file`` provider (``secrets.yaml``, mode
0600). The gateway logs at DEBUG, where EG prints every kernel's environment. The setup
lives in tests/support/compliance_stack.py.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from kernelfleet.cli import main as kernelfleet
from tests.support.compliance_stack import (
    ALICE_TOKEN,
    ALL_VALUES,
    ANALYSTS_PW,
    ENV_PROBE,
    GATEWAY_PYTHON,
    ML_PW,
    Channels,
    Platform,
    channels,
    flushed,
    metric,
    redis_dump,
    run_on,
    running_platform,
    start,
)
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.skipif(not GATEWAY_PYTHON.exists(), reason="needs .venv-gateway")


@pytest.fixture(scope="module")
def platform(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[Platform]:
    redis_server.flush()
    with running_platform(tmp_path_factory.mktemp("compliance"), redis_server) as running:
        yield running


@pytest.fixture
async def as_user(platform: Platform) -> AsyncIterator[Any]:
    clients: list[httpx.AsyncClient] = []

    def make(user: str) -> httpx.AsyncClient:
        headers = {"Authorization": f"token {user}-token"}
        clients.append(httpx.AsyncClient(base_url=platform.url, headers=headers, timeout=60))
        return clients[-1]

    yield make
    for client in clients:
        await client.aclose()


# -- tests -----------------------------------------------------------------------------------


async def test_n_executions_by_two_users_give_n_records_with_user_and_kernel(
    platform: Platform, as_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    alice_kernel, bob_kernel = await asyncio.gather(
        start(as_user("alice"), "python-cpu"), start(as_user("bob"), "python-cpu")
    )
    alice_codes = ["x = 6 * 7", "print(x)", "1 / 0"]
    bob_codes = ["import math", "print(math.pi)"]
    async with channels(platform, alice_kernel, "alice", v1=True, notebook="q3/report.ipynb") as ws:
        alice = Channels(ws, v1=True)
        outcomes = [(await alice.run(code))["reply"]["status"] for code in alice_codes]
    assert outcomes == ["ok", "ok", "error"]
    async with channels(platform, bob_kernel, "bob") as ws:
        for code in bob_codes:
            assert (await Channels(ws, v1=False).run(code))["reply"]["status"] == "ok"
    for kernel_id, user in ((alice_kernel, "alice"), (bob_kernel, "bob")):
        assert (await as_user(user).delete(f"/api/kernels/{kernel_id}")).status_code == 204
    await flushed(platform)

    ours = {alice_kernel: "alice", bob_kernel: "bob"}
    executed = [r for r in platform.records("execute") if r["kernel_id"] in ours]
    assert len(executed) == len(alice_codes) + len(bob_codes)
    assert all(r["user"] == ours[r["kernel_id"]] for r in executed)
    assert [r["code"] for r in executed if r["user"] == "alice"] == alice_codes
    assert [r["code"] for r in executed if r["user"] == "bob"] == bob_codes
    first = executed[0] if executed[0]["user"] == "alice" else executed[-1]
    assert first == {**first, "groups": ["analysts"], "kernelspec": "python-cpu", "pool": "cpu",
                     "notebook_path": "q3/report.ipynb", "cell_id": "cell-1"}  # fmt: skip
    replies = {r["msg_id"]: r for r in platform.records("execute_reply")}
    assert [replies[r["msg_id"]]["outcome"] for r in executed if r["user"] == "alice"] == outcomes
    assert all(replies[r["msg_id"]]["duration_ms"] >= 0 for r in executed)
    stops = [r for r in platform.records("kernel_stop") if r["kernel_id"] in ours]
    assert sorted((r["user"], r["reason"], r["by"]) for r in stops) == [
        ("alice", "shutdown", "alice"), ("bob", "shutdown", "bob")
    ]  # fmt: skip

    path = str(platform.audit)
    query = ["audit", "query", "--path", path, "--user", "alice", "--since", "10m"]
    assert kernelfleet([*query, "--kernel", alice_kernel, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["code"], r["outcome"]) for r in rows] == list(
        zip(alice_codes, outcomes, strict=True)
    )
    assert kernelfleet([*query, "--kernelspec", "python-cpu"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["TIME", "USER", "KERNELSPEC", "KERNEL", "OUTCOME", "MS",
                                "NOTEBOOK", "CODE"]  # fmt: skip
    assert any("alice" in line and "1 / 0" in line and "error" in line for line in table)
    assert not any(" bob " in line for line in table)
    assert kernelfleet(["audit", "verify", "--path", path]) == 0


async def test_secrets_reach_only_their_kernel_and_never_another_groups(
    platform: Platform, as_user: Any
) -> None:
    alice, bob = as_user("alice"), as_user("bob")
    alice_wh, bob_wh, alice_cpu = await asyncio.gather(
        start(alice, "warehouse"), start(bob, "warehouse"), start(alice, "python-cpu")
    )
    assert (await run_on(platform, alice_wh, "alice", ENV_PROBE))["stdout"].split() == [
        ANALYSTS_PW, ALICE_TOKEN
    ]  # fmt: skip
    assert (await run_on(platform, bob_wh, "bob", ENV_PROBE))["stdout"].split() == [ML_PW, "None"]
    assert (await run_on(platform, alice_cpu, "alice", ENV_PROBE))["stdout"].split() == [
        "None", "None"
    ]  # fmt: skip
    assert (await alice.post(f"/api/kernels/{alice_wh}/restart")).status_code == 200
    probe = await run_on(platform, alice_wh, "alice", ENV_PROBE)
    assert probe["stdout"].split() == [ANALYSTS_PW, ALICE_TOKEN]  # a restart keeps them
    pasted = f"assert os.environ['WAREHOUSE_PASSWORD'] == '{ANALYSTS_PW}'; raise ValueError(" \
             "os.environ['API_TOKEN'])"  # fmt: skip
    assert (await run_on(platform, alice_wh, "alice", "import os\n" + pasted))["error"]
    for kernel_id, client in ((alice_wh, alice), (bob_wh, bob), (alice_cpu, alice)):
        await client.delete(f"/api/kernels/{kernel_id}")
    await flushed(platform)

    starts = {r["kernel_id"]: r for r in platform.records("kernel_start")}
    assert starts[alice_wh]["secrets"] == [
        {"env": "WAREHOUSE_PASSWORD", "path": "kv/data/teams/analysts/warehouse"},
        {"env": "API_TOKEN", "path": "kv/data/users/alice/api"},
    ]
    assert starts[bob_wh]["secrets"] == [
        {"env": "WAREHOUSE_PASSWORD", "path": "kv/data/teams/ml/warehouse"}
    ]
    executed = [r for r in platform.records("execute") if r["kernel_id"] == alice_wh]
    assert executed[-1]["code"] == "import os\n" + pasted.replace(
        ANALYSTS_PW, "[secret:WAREHOUSE_PASSWORD]"
    )
    assert executed[-1]["redacted"] == ["WAREHOUSE_PASSWORD"]
    reply = [r for r in platform.records("execute_reply") if r["msg_id"] == executed[-1]["msg_id"]]
    assert reply[0]["error"] == {"ename": "ValueError", "evalue": "[secret:API_TOKEN]",
                                 "redacted": ["API_TOKEN"]}  # fmt: skip


async def test_a_missing_or_refused_secret_fails_the_start_naming_path_and_reason(
    platform: Platform, as_user: Any
) -> None:
    response = await as_user("carol").post("/api/kernels", json={"name": "warehouse"})
    assert response.status_code == 403
    assert response.json()["message"] == (
        "Kernel 'warehouse' cannot start: secret for WAREHOUSE_PASSWORD: "
        f"kv/data/teams/finance/warehouse: not found in {platform.secrets_file}."
    )
    platform.secrets_file.chmod(0o644)
    try:
        response = await as_user("bob").post("/api/kernels", json={"name": "warehouse"})
    finally:
        platform.secrets_file.chmod(0o600)
    assert response.status_code == 503
    assert "its mode is 0644, it must be 0600" in response.json()["message"]
    assert (await as_user("bob").get("/api/kernels")).json() == []  # nothing left running
    await flushed(platform)
    refused = [r for r in platform.records("kernel_refused") if r["kernelspec"] == "warehouse"]
    assert [(r["user"], r["reason"]) for r in refused[-2:]] == [
        ("carol", "secret_not_found"), ("bob", "secrets_unavailable")
    ]  # fmt: skip


async def test_no_secret_value_in_logs_redis_or_audit_files(
    platform: Platform, as_user: Any
) -> None:
    alice = as_user("alice")
    kernel_id = await start(alice, "warehouse")
    await run_on(platform, kernel_id, "alice", "import os\nprint(os.environ['WAREHOUSE_PASSWORD'])")
    await run_on(platform, kernel_id, "alice", "import os\nraise KeyError(os.environ['API_TOKEN'])")
    still_running = await start(as_user("bob"), "warehouse")  # its lease is in Redis now
    await alice.delete(f"/api/kernels/{kernel_id}")
    await flushed(platform)

    gateway_log = platform.gateway_log.read_text(errors="replace")
    assert "BaseProcessProxy.launch_process() env" in gateway_log  # DEBUG: the chattiest level
    client = redis.Redis.from_url(platform.redis.url)
    dump = redis_dump(client)
    client.close()
    assert still_running in dump  # the grep looks at real scheduler state
    audit_files = "".join(p.read_text() for p in platform.audit.parent.iterdir() if p.is_file())
    assert '"event":"execute"' in audit_files
    for where, text in [("gateway log", gateway_log), ("Redis", dump), ("audit", audit_files),
                        ("scheduler log", platform.scheduler_log.read_text())]:  # fmt: skip
        for value in ALL_VALUES:
            assert value not in text, f"a secret value is in the {where}"
    await as_user("bob").delete(f"/api/kernels/{still_running}")


async def test_strict_mode_refuses_executions_while_the_audit_cannot_be_written(
    platform: Platform, as_user: Any
) -> None:
    alice = as_user("alice")
    strict, lax = await asyncio.gather(start(alice, "python-strict"), start(alice, "python-cpu"))
    saved = platform.audit.with_name("saved.jsonl")
    os.replace(platform.audit, saved)
    os.symlink("/dev/full", platform.audit)  # the disk is full from now on
    marker = platform.homes / "alice" / "strict-ran"
    try:
        refused = await run_on(platform, strict, "alice", f"open({str(marker)!r}, 'w').close()")
        assert refused["reply"]["status"] == "error"
        assert refused["reply"]["ename"] == "AuditUnavailable"
        assert (
            refused["error"]
            == refused["reply"]["evalue"]
            == (
                "Execution refused: this kernel's executions must be audited, and the audit log "
                "cannot be written (No space left on device). Your code did not run. Try again in "
                "a minute, or tell an admin."
            )
        )
        lax_run = await run_on(platform, lax, "alice", "print('lax kernels keep working')")
        assert lax_run["stdout"] == "lax kernels keep working\n"
        metrics = (await alice.get("/metrics")).text
        assert "kernelfleet_audit_healthy 0.0" in metrics
        assert metric(metrics, "kernelfleet_audit_buffer_depth") >= 2  # the lax run's records
        response = await alice.post("/api/kernels", json={"name": "python-strict"})
        assert response.status_code == 503 and "must be audited" in response.json()["message"]
    finally:
        os.remove(platform.audit)
        os.replace(saved, platform.audit)  # space again
    assert (await run_on(platform, strict, "alice", "print('audited')"))["stdout"] == "audited\n"
    assert not marker.exists()
    for kernel_id in (strict, lax):
        await alice.delete(f"/api/kernels/{kernel_id}")
    await flushed(platform)
    codes = [r.get("code") for r in platform.records("execute")]
    assert "print('lax kernels keep working')" in codes  # buffered, then written: none lost
    assert not any("strict-ran" in (code or "") for code in codes)  # refused: never recorded
    assert kernelfleet(["audit", "verify", "--path", str(platform.audit)]) == 0


async def test_editing_or_deleting_a_gateway_record_is_named_by_verify(
    platform: Platform, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await flushed(platform)
    lines = platform.audit.read_text().splitlines(keepends=True)
    assert len(lines) > 5
    copy = tmp_path / "audit.jsonl"
    edited = lines.copy()
    edited[3] = edited[3].replace('"user":"', '"user":"not-', 1)
    copy.write_text("".join(edited))
    assert kernelfleet(["audit", "verify", "--path", str(copy)]) == 1
    seq = json.loads(lines[3])["seq"]
    assert f"{copy}:4 (seq {seq}): edited" in capsys.readouterr().err
    copy.write_text("".join(lines[:3] + lines[4:]))
    assert kernelfleet(["audit", "verify", "--path", str(copy)]) == 1
    assert f"{copy}:4 (seq {seq + 1}): deleted: seq {seq} missing" in capsys.readouterr().err
