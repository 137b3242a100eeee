"""`python -m scheduler` as a real process: starts, admits over HTTP, refuses a busy port."""

from __future__ import annotations

import secrets
import select
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.ports import free_port
from tests.support.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 20.0


def _write_config(folder: Path, *, scheduler_port: int, redis_port: int) -> Path:
    config = {
        "host": "127.0.0.1",
        "state_dir": "state",
        "kernelspecs_dir": str(REPO / "kernelspecs"),
        "ports": {"scheduler": scheduler_port, "redis": redis_port},
        "pools": {
            "cpu": {"cpus": 4, "memory": "16Gi"},
            "gpu": {"cpus": 4, "memory": "16Gi", "gpus": 2, "simulated_gpus": True},
        },
        "quotas": {"default": {"kernels": 3}, "groups": {"ml": {"gpus": 1}}},
    }
    path = folder / "kernelfleet.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _start(config: Path, log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "scheduler", "--config", str(config)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
    )  # fmt: skip


def _wait_ready(process: subprocess.Popen[str], log: Path) -> str:
    """The ready line, or fail with the process's log."""
    assert process.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        readable, _, _ = select.select([process.stdout], [], [], 0.1)
        if readable:
            line = process.stdout.readline()
            if line.startswith("scheduler ready on "):
                return line.strip()
        if process.poll() is not None:
            break
    pytest.fail(f"scheduler did not become ready:\n{log.read_text()}")


@pytest.fixture
def scheduler_setup(tmp_path: Path, redis_server: RedisServer, redis_url: str) -> Iterator[tuple]:
    token = secrets.token_hex(16)
    port = free_port()
    config = _write_config(tmp_path, scheduler_port=port, redis_port=redis_server.port)
    (tmp_path / "state" / "secrets").mkdir(parents=True)
    (tmp_path / "state" / "secrets" / "scheduler_token").write_text(token + "\n")
    yield config, token, port


def test_runs_as_a_process_and_admits_over_http(scheduler_setup: tuple, tmp_path: Path) -> None:
    config, token, port = scheduler_setup
    log = tmp_path / "scheduler.log"
    process = _start(config, log)
    try:
        assert _wait_ready(process, log) == f"scheduler ready on http://127.0.0.1:{port}"
        headers = {"Authorization": f"token {token}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers) as client:
            assert client.get("/healthz").json() == {"status": "ok", "redis": "ok"}
            body = {"kernel_id": str(uuid.uuid4()), "user": "carol", "groups": ["ml"],
                    "kernelspec": "python-gpu"}  # fmt: skip
            admitted = client.post("/v1/admissions", json=body)
            assert admitted.status_code == 201, admitted.text
            assert admitted.json()["env"] == {"CUDA_VISIBLE_DEVICES": "0"}
            gpu = client.get("/v1/pools").json()["pools"][1]
            assert gpu["used"]["gpus"] == 1 and gpu["capacity"]["gpus"] == 2
            released = client.delete(f"/v1/leases/{body['kernel_id']}")
            assert released.json() == {"released": True}
            assert client.get("/v1/pools", headers={"Authorization": ""}).status_code == 401
    finally:
        process.terminate()
        process.wait(timeout=10)
        assert process.stdout is not None
        process.stdout.close()
    assert token not in log.read_text()


def test_refuses_to_start_when_the_port_is_in_use(scheduler_setup: tuple) -> None:
    config, _, port = scheduler_setup
    with socket.create_server(("127.0.0.1", port)):
        result = subprocess.run(
            [sys.executable, "-m", "scheduler", "--config", str(config)],
            cwd=REPO, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"scheduler: Port {port} (ports.scheduler in kernelfleet.yaml) is in use; "
        "stop what uses it or change ports.scheduler."
    )
