"""``kernelfleet pools | kernels | quota USER`` against a real scheduler process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kernelfleet.cli import main
from kernelfleet.ops import duration, kernels_table, memory, table
from tests.support.ports import free_port
from tests.support.redis_server import running_redis
from tests.support.scheduler_stack import SERVICE_TOKEN, Stack, write_config

GIB = 2**30


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("cli")
    with running_redis(folder / "redis") as redis:
        made = Stack(folder=folder, redis=redis, port=free_port())
        write_config(folder, scheduler_port=made.port, redis_port=redis.port, eg_port=free_port())
        made.start()
        auth = {"Authorization": f"token {SERVICE_TOKEN}"}
        with httpx.Client(base_url=made.url, headers=auth) as client:
            for kernel_id, user, spec, groups, wait in [
                ("k-alice", "alice", "python-cpu", [], 0),
                ("k-carol", "carol", "python-gpu", ["ml"], 0),
                ("k-dave", "dave", "python-gpu", ["ml"], 0),
                ("k-erin", "erin", "python-gpu", ["ml"], 60),
            ]:
                body = {"kernel_id": kernel_id, "user": user, "groups": groups, "kernelspec": spec}
                answer = client.post("/v1/admissions", json=body, params={"wait_s": wait})
                assert answer.status_code in (201, 202), answer.text
        try:
            yield made
        finally:
            made.stop()


def run(scheduler: Stack, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["--config", str(scheduler.folder / "kernelfleet.yaml"), *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_pools_table(scheduler: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(scheduler, capsys, "pools")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["POOL", "CPUS", "MEMORY", "GPUS", "KERNELS", "STARTING", "IDLE",
                                "BUSY", "QUEUED", "$/HOUR"]  # fmt: skip
    assert lines[1].split() == ["cpu", "1/8", "2", "GiB/32", "GiB", "0/0", "1", "1", "0", "0",
                                "0", "0.00"]  # fmt: skip
    assert lines[2].split() == ["gpu", "2/8", "8", "GiB/32", "GiB", "2/2", "(sim)", "2", "2", "0",
                                "0", "1", "0.00"]  # fmt: skip


def test_kernels_table_with_filters(scheduler: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(scheduler, capsys, "kernels", "--pool", "gpu")
    assert code == 0
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [(r[0], r[1], r[2], r[3], r[4], r[8]) for r in rows] == [
        ("k-carol", "carol", "python-gpu", "gpu", "starting", "0"),
        ("k-dave", "dave", "python-gpu", "gpu", "starting", "1"),
    ]
    code, out = run(scheduler, capsys, "kernels", "--user", "nobody")
    assert (code, out.strip()) == (0, "No kernels.")


def test_quota_report(scheduler: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(scheduler, capsys, "quota", "erin")
    assert code == 0
    assert out.splitlines()[0] == "User erin (groups: ml)"
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[3:8]}
    assert rows["kernels"] == ["0", "3"] and rows["gpus"] == ["0", "1"]
    assert rows["memory"] == ["0", "B", "unlimited"]
    assert "python-gpu (k-erin): Waiting for pool gpu: you are 1st in line." in out


def test_an_unreachable_scheduler_is_one_clear_line(
    scheduler: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out = run(scheduler, capsys, "pools", "--scheduler-url", url)
    assert code == 2
    assert out.strip() == (
        f"kernelfleet: error: The scheduler at {url} is unreachable (ConnectError); "
        "is `kernelfleet up` running?"
    )


def test_formatting_helpers() -> None:
    assert [duration(s) for s in (5, 125, 7500, 200000)] == ["5s", "2m", "2h05m", "2d07h"]
    assert memory(3 * GIB // 2) == "1.5 GiB" and memory(512) == "512 B"
    assert table(["A", "BB"], [[1, 2], ["long", 3]]).splitlines() == [
        "A     BB", "1     2", "long  3",
    ]  # fmt: skip
    lease = {"kernel_id": "k", "user": "u", "kernelspec": "s", "pool": "p", "state": "stopped",
             "stop_reason": "died", "cpus": 1.5, "memory": GIB, "gpu_devices": [], "created": 0,
             "last_activity": 60, "connections": 0}  # fmt: skip
    assert kernels_table([lease], now=120).splitlines()[1].split() == [
        "k", "u", "s", "p", "stopped", "(died)", "1.5", "1", "GiB", "-", "2m", "1m", "0",
    ]  # fmt: skip


def test_the_token_file_is_required(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "kernelfleet.yaml").write_text("state_dir: state\n")
    assert main(["--config", str(tmp_path / "kernelfleet.yaml"), "pools"]) == 2
    assert "run `kernelfleet up` once to create it" in capsys.readouterr().err
