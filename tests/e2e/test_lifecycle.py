"""`kernelfleet up` as its users see it: a second run keeps state, Ctrl-C stops everything."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from kernelfleet.processes import port_in_use

from .stack import HubUser, start_stack, stop_stack_process, write_test_config

pytestmark = pytest.mark.e2e


def _descendants(pid: int) -> set[int]:
    """Every process whose ancestry leads to ``pid`` (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


async def test_ctrl_c_stops_every_process_and_a_second_run_keeps_logins(tmp_path: Path) -> None:
    config = write_test_config(tmp_path)
    stack = start_stack(config)
    try:
        logins_file = stack.state_dir / "demo-logins.txt"
        lines = logins_file.read_text().splitlines()
        assert [line.split()[0] for line in lines] == ["alice", "bob", "carol", "ops"]
        assert len({line.split()[1] for line in lines}) == 4  # no shared password
        assert oct(logins_file.stat().st_mode & 0o777) == "0o600"
        # a kernel is running when the user presses Ctrl-C
        alice = HubUser(stack, "alice")
        await alice.login()
        await alice.start_server()
        assert (await alice.start_kernel("python-cpu")).status_code == 201
        await alice.close()
        started = _descendants(stack.process.pid)
        assert len(started) >= 6  # redis, scheduler, EG, hub, proxy, notebook, kernel
        stack.process.send_signal(signal.SIGINT)
        assert stack.process.wait(60) == 0
    finally:
        stop_stack_process(stack.process)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and [p for p in started if _alive(p)]:
        time.sleep(0.2)
    assert not [p for p in started if _alive(p)], "processes left running after Ctrl-C"
    for name, port in stack.ports.items():
        assert not port_in_use(stack.host, port), f"{name} port {port} still open"

    again = start_stack(config)
    try:
        assert (again.state_dir / "demo-logins.txt").read_text().splitlines() == lines
        alice = HubUser(again, "alice")
        page = await alice.login()
        assert "/hub/login" not in str(page.url)
        await alice.close()
    finally:
        stop_stack_process(again.process)
