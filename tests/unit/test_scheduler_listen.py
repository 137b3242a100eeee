"""The scheduler's listening socket: connections it accepts have Nagle's algorithm off."""

from __future__ import annotations

import socket

from kernelfleet.config import PlatformConfig
from scheduler.__main__ import listen
from tests.support.ports import free_port


def test_accepted_connections_have_tcp_nodelay() -> None:
    """uvicorn writes a response's headers and body separately; with Nagle on, every
    keep-alive request (the gateway's admissions) waited ~40 ms for a delayed ACK."""
    platform = PlatformConfig.model_validate({"ports": {"scheduler": free_port()}})
    with listen(platform) as server:
        with socket.create_connection(server.getsockname()[:2]):
            accepted, _ = server.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
