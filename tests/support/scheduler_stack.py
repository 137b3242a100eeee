"""A real scheduler process (``python -m scheduler``) on a real Redis, with an Enterprise
Gateway stand-in: a threaded HTTP server that lists "running" kernels and records every
shutdown the scheduler's reconciliation asks for."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.ports import free_port
from tests.support.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[2]

READY_TIMEOUT_S = 20.0

SERVICE_TOKEN = "durability-" + uuid.uuid4().hex

GATEWAY_TOKEN = "eg-service-" + uuid.uuid4().hex


class GatewayStandIn(BaseHTTPRequestHandler):
    """EG's GET /api/kernels and DELETE /api/kernels/{id} for the gateway's service token."""

    running: set[str] = set()
    shutdowns: list[str] = []

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _answer(self, status: int, body: Any = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == f"token {GATEWAY_TOKEN}":
            return True
        self._answer(401, {"message": "no"})
        return False

    def do_GET(self) -> None:
        if self._authorized():
            self._answer(200, [{"id": k, "name": "python-cpu"} for k in sorted(self.running)])

    def do_DELETE(self) -> None:
        if self._authorized():
            kernel_id = self.path.rsplit("/", 1)[-1]
            type(self).shutdowns.append(kernel_id)
            self.running.discard(kernel_id)
            self._answer(204)


@dataclass
class Stack:
    """Redis (AOF), the EG stand-in and a scheduler process that tests may kill."""

    folder: Path
    redis: RedisServer
    port: int
    process: subprocess.Popen[str] | None = None
    logs: list[Path] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> float:
        """Start the scheduler; seconds until it printed its ready line."""
        log = self.folder / f"scheduler-{len(self.logs)}.log"
        self.logs.append(log)
        began = time.monotonic()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "scheduler",
                "--config",
                str(self.folder / "kernelfleet.yaml"),
                "--reconcile-interval",
                "0.2",
                "--lease-grace",
                "0",
                "--kernel-grace",
                "0.5",
                *self.extra_args,
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
        )
        assert self.process.stdout is not None
        while time.monotonic() < began + READY_TIMEOUT_S:
            if select.select([self.process.stdout], [], [], 0.05)[0]:
                if self.process.stdout.readline().startswith("scheduler ready on "):
                    return time.monotonic() - began
            if self.process.poll() is not None:
                break
        pytest.fail(f"scheduler did not become ready:\n{log.read_text()}")

    def kill(self) -> None:
        """kill -9, as a crash would."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)
        assert self.process.stdout is not None
        self.process.stdout.close()
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            assert self.process.stdout is not None
            self.process.stdout.close()
            self.process = None

    def log(self) -> str:
        return "".join(path.read_text() for path in self.logs)


def write_config(folder: Path, *, scheduler_port: int, redis_port: int, eg_port: int) -> None:
    config = {
        "host": "127.0.0.1",
        "state_dir": "state",
        "kernelspecs_dir": str(REPO / "kernelspecs"),
        "ports": {
            "scheduler": scheduler_port,
            "redis": redis_port,
            "gateway": eg_port,
            "hub_api": free_port(),
        },
        "pools": {
            "cpu": {"cpus": 8, "memory": "32Gi"},
            "gpu": {"cpus": 8, "memory": "32Gi", "gpus": 2, "simulated_gpus": True},
        },
        "quotas": {"default": {"kernels": 3}, "groups": {"ml": {"gpus": 1}}},
        "kernel_launch_timeout": 60,
    }
    (folder / "kernelfleet.yaml").write_text(yaml.safe_dump(config))
    secrets = folder / "state" / "secrets"
    secrets.mkdir(parents=True)
    (secrets / "scheduler_token").write_text(SERVICE_TOKEN)
    (secrets / "gateway_service_token").write_text(GATEWAY_TOKEN)
