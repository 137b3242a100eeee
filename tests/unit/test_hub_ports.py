"""hub.ports: notebook servers' ports, outside the ephemeral range and never handed twice."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest

from hub.ports import ServerPorts, above_ephemeral_range, can_bind, parse_range


def test_above_the_ephemeral_range(tmp_path: Path) -> None:
    ephemeral = tmp_path / "ip_local_port_range"
    ephemeral.write_text("32768\t60999\n")
    assert above_ephemeral_range(ephemeral) == (61000, 65535)
    ephemeral.write_text("1024\t65535\n")  # nothing left above it
    assert above_ephemeral_range(ephemeral) is None
    assert above_ephemeral_range(tmp_path / "missing") is None


def test_ranges_parse_or_say_why() -> None:
    assert parse_range("61000..65535") == (61000, 65535)
    assert parse_range("0..0") is None
    with pytest.raises(ValueError, match="lo..hi"):
        parse_range("61000-65535")
    with pytest.raises(ValueError, match="within 1024..65535"):
        parse_range("65000..70000")


def test_a_port_held_by_an_outgoing_connection_is_not_free() -> None:
    """What made a server fail to start in the bench: its port was an outgoing
    connection's local port by the time it bound it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.socket() as client:
            client.connect(listener.getsockname())
            assert not can_bind("127.0.0.1", client.getsockname()[1])
        assert not can_bind("127.0.0.1", listener.getsockname()[1])


def test_ports_are_free_and_not_handed_out_twice_while_reserved() -> None:
    now = [0.0]
    taken = {61003}
    ports = ServerPorts(reserve_s=60, clock=lambda: now[0], rng=random.Random(1),
                        is_free=lambda ip, port: port not in taken)  # fmt: skip
    given = {ports.pick("127.0.0.1", (61000, 61004)) for _ in range(4)}
    assert given == {61000, 61001, 61002, 61004}
    with pytest.raises(RuntimeError, match="widen KernelfleetSpawner.server_port_range"):
        ports.pick("127.0.0.1", (61000, 61004))
    now[0] = 61.0  # the reservations ran out: the servers have long bound their ports
    assert ports.pick("127.0.0.1", (61000, 61004)) in given
