"""hub.spawner.KernelfleetSpawner: a lightweight, gateway-backed notebook server per user."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from jupyterhub.spawner import SimpleLocalProcessSpawner
from traitlets.config import Config

from hub.spawner import KernelfleetSpawner, user_home


def make_spawner(tmp_path: Path, name: str = "alice", **traits) -> KernelfleetSpawner:
    c = Config()
    c.KernelfleetSpawner.home_root = str(tmp_path / "home")
    c.KernelfleetSpawner.gateway_url = "http://127.0.0.1:18888/"
    c.KernelfleetSpawner.kernel_launch_timeout = 45
    for key, value in traits.items():
        c.KernelfleetSpawner[key] = value
    return KernelfleetSpawner(user=SimpleNamespace(name=name), config=c, api_token="server-tok")


def test_gateway_env_uses_the_servers_own_token(tmp_path) -> None:
    env = make_spawner(tmp_path).gateway_env()
    assert env["JUPYTER_GATEWAY_URL"] == "http://127.0.0.1:18888"
    assert env["JUPYTER_GATEWAY_AUTH_SCHEME"] == "token"
    assert env["JUPYTER_GATEWAY_AUTH_TOKEN"] == "server-tok"


def test_request_timeout_exceeds_launch_timeout(tmp_path) -> None:
    env = make_spawner(tmp_path, gateway_request_margin=20.0).gateway_env()
    assert float(env["JUPYTER_GATEWAY_REQUEST_TIMEOUT"]) == 65.0
    assert env["KERNEL_LAUNCH_TIMEOUT"] == "45"
    # jupyter-server keeps KERNEL_LAUNCH_TIMEOUT when request_timeout == launch + pad
    assert float(env["JUPYTER_GATEWAY_LAUNCH_TIMEOUT_PAD"]) == 20.0


def test_command_is_this_venvs_singleuser(tmp_path) -> None:
    spawner = make_spawner(tmp_path)
    assert spawner.cmd == [str(Path(sys.executable).parent / "jupyterhub-singleuser")]
    assert spawner.default_url == "/lab"


def test_args_enable_the_gateway_client_and_disable_terminals(tmp_path) -> None:
    args = make_spawner(tmp_path, args=["--debug"]).get_args()
    assert args[0] == "--debug"
    assert "--ServerApp.jpserver_extensions={'gateway.client': True}" in args
    assert "--ServerApp.terminals_enabled=False" in args
    assert ("--allow-root" in args) == (os.geteuid() == 0)


def test_home_under_the_state_dir(tmp_path) -> None:
    spawner = make_spawner(tmp_path)
    assert spawner.home_dir == str(tmp_path / "home" / "alice")
    assert spawner.notebook_dir == spawner.home_dir
    assert spawner.disable_user_config is True


async def test_start_creates_a_private_home(tmp_path, monkeypatch) -> None:
    async def fake_start(self):
        return ("127.0.0.1", 12345)

    monkeypatch.setattr(SimpleLocalProcessSpawner, "start", fake_start)
    spawner = make_spawner(tmp_path)
    assert await spawner.start() == ("127.0.0.1", 12345)
    home = tmp_path / "home" / "alice"
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


@pytest.mark.parametrize("name", ["..", ".", "a/b", ""])
def test_names_that_escape_the_home_root_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="folder name"):
        user_home(Path("/state/home"), name)


def test_gateway_url_must_be_http(tmp_path) -> None:
    with pytest.raises(ValueError, match="http"):
        make_spawner(tmp_path, gateway_url="127.0.0.1:8888")


async def test_progress_says_what_is_happening(tmp_path) -> None:
    events = [event async for event in make_spawner(tmp_path).progress()]
    assert "alice" in events[0]["message"]


async def test_start_picks_a_port_above_the_ephemeral_range(tmp_path, monkeypatch) -> None:
    """Ports handed out by port 0 come from the ephemeral range, where an outgoing
    connection or a kernel's socket can take one before the server binds it."""

    async def fake_start(self):
        return (self.ip or "127.0.0.1", self.port)

    monkeypatch.setattr(SimpleLocalProcessSpawner, "start", fake_start)
    spawner = make_spawner(tmp_path, server_port_range="62000..62100")
    first = (await spawner.start())[1]
    assert 62000 <= first <= 62100
    again = (await make_spawner(tmp_path, name="bob",
                                server_port_range="62000..62100").start())[1]  # fmt: skip
    assert again != first  # another server never gets a port handed out moments ago
    # restarted: a new pick (the old port may be taken by now), unless configured
    assert 62000 <= (await spawner.start())[1] <= 62100
    fixed = make_spawner(tmp_path, name="carol", port=40123, server_port_range="62000..62100")
    assert (await fixed.start())[1] == 40123


def test_the_default_port_range_is_above_the_ephemeral_range(tmp_path) -> None:
    lo, hi = (int(p) for p in make_spawner(tmp_path).server_port_range.split(".."))
    ephemeral_last = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[1])
    assert lo == ephemeral_last + 1 and hi == 65535


@pytest.mark.parametrize("bad", ["61000-65535", "70000..70001", "2000..1000", "x..y", "80..90"])
def test_a_bad_port_range_is_refused_by_name(tmp_path, bad: str) -> None:
    with pytest.raises(ValueError, match="server_port_range"):
        make_spawner(tmp_path, server_port_range=bad)
