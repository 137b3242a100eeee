"""Ports for users' notebook servers that nothing else on the host can take meanwhile.

Stock JupyterHub picks a server's port by binding to port 0 and closing the socket; the
server binds it seconds later (tens of seconds when 50 users log in at once on 2 cores).
Port 0 hands out ports from the system's ephemeral range, the range every outgoing
connection and every ZMQ socket bound to port 0 takes its local port from, and in that
window one of them can take the server's port: the server exits with "port ... is not
available" and the hub, still waiting for an answer there, fails the spawn only after
``http_timeout`` (seen in the bench's users phase: one user in fifty, bench/README.md).

So kernelfleet's spawner picks servers' ports from :func:`above_ephemeral_range` (the
kernels' ports are below it, ``gateway/server/ports.py``), never one it handed out in the
last :data:`RESERVE_S` seconds, and only one it can bind right now.
"""

from __future__ import annotations

import errno
import random
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
HIGHEST_PORT = 65535
#: A range smaller than this is not worth using: port 0 (stock JupyterHub) instead.
MIN_RANGE_SIZE = 500
#: Seconds a port handed to a server is kept from other servers (it binds within that).
RESERVE_S = 600.0
#: Ports tried before giving up on the range.
MAX_TRIES = 50


def above_ephemeral_range(ephemeral: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int] | None:
    """The ports above the system's ephemeral range (61000-65535 with Linux's default
    32768-60999), or None when that leaves fewer than :data:`MIN_RANGE_SIZE` or the range
    is unknown."""
    try:
        last = int(ephemeral.read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    if HIGHEST_PORT - last < MIN_RANGE_SIZE:
        return None
    return last + 1, HIGHEST_PORT


def parse_range(text: str) -> tuple[int, int] | None:
    """``"lo..hi"`` as a pair; ``"0..0"`` means "any free port" (None). Raises ValueError
    naming the problem."""
    lo_text, sep, hi_text = text.partition("..")
    try:
        lo, hi = int(lo_text), int(hi_text)
    except ValueError:
        sep = ""
    if not sep:
        raise ValueError(f"a port range is written lo..hi (e.g. 61000..65535), got {text!r}")
    if (lo, hi) == (0, 0):
        return None
    if not 1024 <= lo <= hi <= HIGHEST_PORT:
        raise ValueError(f"port range {text!r} must lie within 1024..{HIGHEST_PORT}, lo <= hi")
    return lo, hi


def can_bind(ip: str, port: int) -> bool:
    """Whether a server could listen on ``ip:port`` now (tried without SO_REUSEADDR, so a
    port that an outgoing connection holds counts as taken)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((ip or "0.0.0.0", port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                return False
            raise
    return True


class ServerPorts:
    """Hands out ports from ``(lo, hi)``: free now and not handed out recently."""

    def __init__(
        self,
        *,
        reserve_s: float = RESERVE_S,
        clock: Callable[[], float] = time.monotonic,
        is_free: Callable[[str, int], bool] = can_bind,
        rng: random.Random | None = None,
    ) -> None:
        self._reserve_s = reserve_s
        self._clock = clock
        self._is_free = is_free
        self._rng = rng or random.Random()
        self._given: dict[int, float] = {}
        self._lock = threading.Lock()

    def pick(self, ip: str, port_range: tuple[int, int]) -> int:
        """A port of ``port_range`` for a server on ``ip``; raises RuntimeError saying
        what to change when none of :data:`MAX_TRIES` tries was free."""
        lo, hi = port_range
        with self._lock:
            now = self._clock()
            self._given = {p: t for p, t in self._given.items() if now - t < self._reserve_s}
            for _ in range(MAX_TRIES):
                port = self._rng.randint(lo, hi)
                if port not in self._given and self._is_free(ip, port):
                    self._given[port] = now
                    return port
        raise RuntimeError(
            f"no free port for a notebook server in {lo}..{hi} after {MAX_TRIES} tries: "
            "widen KernelfleetSpawner.server_port_range (or set it to 0..0 for any free port)"
        )


#: The hub's one ledger: every spawner of this process picks from it.
SERVER_PORTS = ServerPorts()
