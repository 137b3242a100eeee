"""A real ``python -m scheduler`` process for the admission phase, and an HTTP client for it."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from kernelfleet.config import PlatformConfig
from scheduler.leases import Lease
from tests.support.ports import free_port

from .http1 import Http1Pool

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 30.0


@dataclass
class SchedulerApi:
    """Admissions and releases over the scheduler's HTTP API (docs/contracts.md)."""

    pool: Http1Pool

    async def decide(self, kernel_id: str, user: str, groups: list[str], spec: str
                     ) -> tuple[str, Lease | None]:  # fmt: skip
        """POST /v1/admissions; ("admitted", lease) or (error code, None)."""
        body = {"kernel_id": kernel_id, "user": user, "groups": groups, "kernelspec": spec}
        status, answer = await self.pool.request("POST", "/v1/admissions", body=body)
        if status == 201:
            return "admitted", Lease.model_validate(answer["lease"])
        return str((answer or {}).get("error", f"http_{status}")), None

    async def release(self, kernel_id: str) -> None:
        """DELETE /v1/leases/{kernel_id}."""
        await self.pool.request("DELETE", f"/v1/leases/{kernel_id}")


@dataclass
class SchedulerProcess:
    """The scheduler service on a free loopback port, state in Redis at ``redis_url``."""

    url: str
    token: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    @asynccontextmanager
    async def started(cls, folder: Path, platform: PlatformConfig, *, redis_url: str
                      ) -> AsyncIterator[SchedulerProcess]:  # fmt: skip
        """Start it with ``platform`` as its kernelfleet.yaml; stop it on exit."""
        process = cls._launch(folder, platform, redis_url)
        try:
            await process._wait_ready()
            yield process
        finally:
            process.stop()

    @classmethod
    def _launch(cls, folder: Path, platform: PlatformConfig, redis_url: str) -> SchedulerProcess:
        (folder / "secrets").mkdir(parents=True, exist_ok=True)
        token, port = secrets.token_hex(16), free_port()
        (folder / "secrets" / "scheduler_token").write_text(token)
        raw = platform.model_dump(mode="json", exclude={"source"})
        raw.update(host="127.0.0.1", state_dir=str(folder))
        raw["ports"]["scheduler"] = port
        config = folder / "kernelfleet.yaml"
        config.write_text(yaml.safe_dump(raw))
        log_path = folder / "scheduler.log"
        argv = [sys.executable, "-m", "scheduler", "--config", str(config),
                "--redis-url", redis_url, "--log-level", "warning"]  # fmt: skip
        with log_path.open("wb") as log:
            popen = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip
        return cls(f"http://127.0.0.1:{port}", token, popen, log_path)

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        async with httpx.AsyncClient(base_url=self.url, timeout=2) as http:
            while time.monotonic() < deadline and self.popen.poll() is None:
                try:
                    if (await http.get("/healthz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the scheduler did not start:\n{tail}")

    @asynccontextmanager
    async def client(self, concurrency: int) -> AsyncIterator[SchedulerApi]:
        """An API client with up to ``concurrency`` connections (as many as requests)."""
        pool = Http1Pool(self.url, concurrency, headers={"Authorization": f"token {self.token}"})
        try:
            yield SchedulerApi(pool)
        finally:
            await pool.aclose()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
