"""TCP latency knobs for the kernel websocket hops (DESIGN.md, Performance principles).

Kernel traffic is many small frames. With Nagle's algorithm on, a sender holds a small
frame while an earlier one is unacknowledged, and Linux delays ACKs up to 40 ms: every
execute round trip then costs ~40 ms extra. TCP_NODELAY fixes our own sends; for a peer
that leaves Nagle on (stock Enterprise Gateway does), acknowledging each frame at once
(TCP_QUICKACK, Linux only) releases its next frame without the delayed-ACK wait.
"""

from __future__ import annotations

import socket
from typing import Any

_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def stream_socket(stream: Any) -> socket.socket | None:
    """The TCP socket under a tornado stream, or None when closed or not a socket."""
    sock = getattr(stream, "socket", None)
    if not isinstance(sock, socket.socket) or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return sock


def set_nodelay(sock: socket.socket | None) -> None:
    """Turn Nagle's algorithm off on ``sock`` (no-op for None or a closed socket)."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # closed meanwhile; the close is handled by the stream's owner


def ack_now(sock: socket.socket | None) -> None:
    """Send any pending ACK on ``sock`` now instead of up to 40 ms later (Linux only).

    Quick-ACK mode is not sticky, so call it after each read from a Nagle-ing peer.
    """
    if sock is None or _QUICKACK is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
    except OSError:
        pass  # closed meanwhile; the close is handled by the stream's owner
