"""Distinct ZMQ ports for kernels launched at the same time.

jupyter_client 6 (inside EG) picks a local kernel's five ports by binding to port 0 and
closing the sockets again; the kernel binds them a moment later. Launches in quick
succession can get a port that an earlier launch was just given and whose kernel has not
bound it yet: the later kernel dies with ``Address already in use`` and its user waits two
minutes for a kernel that never answers. With 50 users starting kernels at once that
happened about once per run (bench/README.md, users phase). jupyter_client 8 keeps a cache
of the ports it handed out for the same reason; :class:`DistinctPortsMixin` does the same
for EG's kernel managers.

Binding to port 0 also takes ports from the system's ephemeral range, where every outgoing
connection (a websocket to EG, an HTTP client) gets its local port, and one of those can
take a kernel's port in the same window (seen in the bench: ``Address already in use`` from
a kernel's heartbeat socket). So the gateway's default ``port_range`` (EG's setting, also
``EG_PORT_RANGE``) is :func:`below_ephemeral_range`: EG then picks kernels' ports at random
from below that range, checking each is free.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

from jupyter_client.connect import port_names

#: Seconds a handed-out port is kept from other launches (a kernel binds it within that).
RESERVE_S = 300.0
MAX_TRIES = 10
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PORT = 10000


def below_ephemeral_range(ephemeral: Path = EPHEMERAL_RANGE_FILE) -> str:
    """EG's ``port_range`` for kernels: from :data:`LOWEST_PORT` to just below the ephemeral
    range; "0..0" (EG picks any free port) when that range starts too low or is unknown."""
    try:
        first = int(ephemeral.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return "0..0"
    # EG wants at least EG_MIN_PORT_RANGE_SIZE (1000) ports in a range.
    return f"{LOWEST_PORT}..{first - 1}" if first - 1 - LOWEST_PORT >= 1000 else "0..0"


class PortLedger:
    """Ports handed out recently, with the time each was handed out (thread-safe)."""

    def __init__(
        self, *, reserve_s: float = RESERVE_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._reserve_s = reserve_s
        self._clock = clock
        self._given: dict[int, float] = {}
        self._lock = threading.Lock()

    def claim(self, ports: Iterable[int]) -> bool:
        """Reserve all of ``ports`` if none is reserved already; False (nothing reserved) if
        one is. Port 0 (unset) is ignored."""
        wanted = [port for port in ports if port]
        with self._lock:
            now = self._clock()
            self._given = {p: t for p, t in self._given.items() if now - t < self._reserve_s}
            if any(port in self._given for port in wanted) or len(set(wanted)) < len(wanted):
                return False
            self._given.update(dict.fromkeys(wanted, now))
            return True


class DistinctPortsMixin:
    """For a jupyter_client 6 KernelManager: retry the connection file until its ports differ
    from every port handed out in the last :data:`RESERVE_S` seconds (by this process)."""

    ports_ledger: ClassVar[PortLedger] = PortLedger()

    def write_connection_file(self) -> None:
        """The stock connection file, with ports no recent launch was given."""
        fixed = {name: getattr(self, name) for name in port_names if getattr(self, name)}
        for _ in range(MAX_TRIES):
            super().write_connection_file()  # type: ignore[misc]
            chosen = [getattr(self, name) for name in port_names]
            random_ports = [port for name, port in zip(port_names, chosen, strict=True)
                            if name not in fixed]  # fmt: skip
            if self.ports_ledger.claim(random_ports):
                return
            self._forget_random_ports(fixed)

    def _forget_random_ports(self, fixed: dict[str, Any]) -> None:
        """Drop the connection file and the randomly chosen ports so the next write picks new."""
        self.cleanup_connection_file()  # type: ignore[attr-defined]
        for name in port_names:
            setattr(self, name, fixed.get(name, 0))
        self._connection_file_written = False
