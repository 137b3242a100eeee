"""Start, watch and stop the platform's processes (the embedded default).

Each component runs in its own process group with its output in ``logs/<name>.log``, so
stopping one stops everything it started (kernels included) and a crash can be explained
with the tail of its log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import StartupError


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def check_ports_free(host: str, ports: dict[str, int], *, source: Path) -> None:
    """Fail before starting anything if a configured port is taken, naming the setting."""
    for setting, port in ports.items():
        if port_in_use(host, port):
            raise StartupError(
                f"port {port} ({setting} in {source}) is in use: stop what uses it "
                f"(`ss -ltnp 'sport = :{port}'` shows it) or change {setting}"
            )


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


@dataclass
class Component:
    """One supervised process and how to tell that it is ready."""

    name: str
    argv: list[str]
    ready: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    start_timeout: float = 60.0
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None


def http_ok(url: str, *, ok: tuple[int, ...] = (200,)) -> Callable[[], bool]:
    """A readiness check: the URL answers one of the ``ok`` statuses (a proxy's 404 before
    its routes exist is not ready; a gateway's 401 to an anonymous probe is)."""

    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status in ok
        except urllib.error.HTTPError as e:
            return e.code in ok
        except (urllib.error.URLError, OSError):
            return False

    return check


class Supervisor:
    """Starts components in order, waits for each to be ready, stops them in reverse."""

    def __init__(self, log_dir: Path, *, progress: Callable[[str], None]) -> None:
        self.log_dir = log_dir
        self.progress = progress
        self.components: list[Component] = []

    def start(self, component: Component) -> None:
        """Start one component and block until it is ready, or raise with its log tail."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        component.log = self.log_dir / f"{component.name}.log"
        with open(component.log, "ab") as log:
            component.process = subprocess.Popen(
                component.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **component.env},
                cwd=component.cwd,
                start_new_session=True,
            )
        self.components.append(component)
        deadline = time.monotonic() + component.start_timeout
        while not component.ready():
            if component.process.poll() is not None:
                raise StartupError(
                    f"{component.name} exited with code {component.process.returncode} while "
                    f"starting; last lines of {component.log}:\n{log_tail(component.log)}"
                )
            if time.monotonic() > deadline:
                raise StartupError(
                    f"{component.name} was not ready after {component.start_timeout:.0f} s; "
                    f"last lines of {component.log}:\n{log_tail(component.log)}"
                )
            time.sleep(0.1)

    def first_exited(self) -> Component | None:
        """A component whose process has died, if any."""
        for component in self.components:
            if component.process is not None and component.process.poll() is not None:
                return component
        return None

    def stop_all(self, *, timeout: float = 10.0) -> None:
        """SIGTERM each process group (last started first), SIGKILL what remains."""
        for component in reversed(self.components):
            self._signal(component, signal.SIGTERM)
            self._wait(component, timeout)
        for component in self.components:
            self._signal(component, signal.SIGKILL)
        self.components.clear()

    @staticmethod
    def _signal(component: Component, sig: signal.Signals) -> None:
        if component.process is None:
            return
        try:
            os.killpg(component.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def _wait(component: Component, timeout: float) -> None:
        if component.process is None:
            return
        try:
            component.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
