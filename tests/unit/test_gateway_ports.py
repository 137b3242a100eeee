"""Kernels launched together never get the same ZMQ port (gateway/server/ports.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jupyter_client.connect import port_names

from gateway.server.ports import DistinctPortsMixin, PortLedger, below_ephemeral_range


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_port_is_given_once_until_its_reservation_ends() -> None:
    clock = FakeClock()
    ledger = PortLedger(reserve_s=10, clock=clock)
    assert ledger.claim([5001, 5002])
    assert not ledger.claim([5003, 5002])  # 5002 is taken: nothing of this claim is kept
    assert ledger.claim([5003, 0, 0])  # 0 means "not chosen yet" and is ignored
    assert not ledger.claim([5004, 5004])
    clock.now = 11
    assert ledger.claim([5001, 5002])


class ScriptedManager:
    """Stands in for jupyter_client's KernelManager: each write 'picks' the next port set."""

    def __init__(self, picks: list[list[int]]) -> None:
        self.picks = picks
        self.writes = self.cleanups = 0
        self._connection_file_written = False
        for name in port_names:
            setattr(self, name, 0)

    def write_connection_file(self) -> None:
        for name, port in zip(port_names, self.picks[self.writes], strict=True):
            if not getattr(self, name):
                setattr(self, name, port)
        self.writes += 1
        self._connection_file_written = True

    def cleanup_connection_file(self) -> None:
        self.cleanups += 1
        self._connection_file_written = False


def _manager(picks: list[list[int]], ledger: PortLedger) -> Any:
    class Manager(DistinctPortsMixin, ScriptedManager):
        ports_ledger = ledger

    return Manager(picks)


def test_a_launch_given_a_recent_port_picks_again() -> None:
    ledger = PortLedger()
    first = _manager([[1, 2, 3, 4, 5]], ledger)
    first.write_connection_file()
    second = _manager([[6, 7, 3, 8, 9], [10, 11, 12, 13, 14]], ledger)
    second.write_connection_file()
    assert [getattr(second, name) for name in port_names] == [10, 11, 12, 13, 14]
    assert (second.writes, second.cleanups) == (2, 1)


def test_ports_set_by_the_caller_are_kept() -> None:
    ledger = PortLedger()
    ledger.claim([7])
    manager = _manager([[1, 2, 3, 4, 5]], ledger)
    manager.shell_port = 7  # configured, not random: never re-picked nor refused
    manager.write_connection_file()
    assert manager.shell_port == 7 and manager.writes == 1


def test_kernels_ports_come_from_below_the_ephemeral_range(tmp_path: Path) -> None:
    (tmp_path / "usual").write_text("32768\t60999\n")
    assert below_ephemeral_range(tmp_path / "usual") == "10000..32767"
    (tmp_path / "low").write_text("1024\t65535\n")  # no room below: EG's own pick
    assert below_ephemeral_range(tmp_path / "low") == "0..0"
    assert below_ephemeral_range(tmp_path / "missing") == "0..0"
