"""Waiting for a gateway process that tests started to answer HTTP."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx

#: A loaded 2-core CI machine is slow to import EG.
GATEWAY_START_S = 60.0


def wait_for_gateway(url: str, process: subprocess.Popen[str], log: Path, *,
                     timeout_s: float = GATEWAY_START_S) -> None:  # fmt: skip
    """Return once ``url/api`` answers; raise with the end of ``log`` if the process exits
    or ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited ({process.returncode}):\n"
                               f"{log.read_text()[-3000:]}")  # fmt: skip
        try:
            httpx.get(f"{url}/api", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"gateway did not start in {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
