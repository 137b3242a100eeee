"""A real JupyterHub with kernelfleet's config: browser-style logins and a spawned server.

Starts `jupyterhub -f hub/jupyterhub_config.py` on free ports with a temporary state dir
and kernelfleet.yaml, then logs in with httpx the way a browser does (login page ->
_xsrf -> form POST -> spawn -> OAuth to the user's server). Needs configurable-http-proxy
in .kernelfleet/node (`npm install --prefix .kernelfleet/node configurable-http-proxy@4`).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from hub.config import chp_path
from hub.passwords import write_password_file

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
CHP_INSTALL = REPO / ".kernelfleet" / "node"
PASSWORDS = {"alice": "alice-Pw-1", "bob": "bob-Pw-2", "ops": "ops-Pw-3"}
USERS = {
    "alice": {"groups": ["analysts"]},
    "bob": {"groups": ["analysts", "ml"]},
    "ops": {"admin": True},
}
LOGIN_ERROR = "Invalid username or password"
LOGIN_COOKIE = "jupyterhub-hub-login"


@dataclass
class RunningHub:
    url: str
    api_url: str
    state_dir: Path
    gateway_port: int
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def write_platform(root: Path, ports: list[int]) -> Path:
    hub, hub_api, proxy_api, gateway = ports
    config = {
        "host": "127.0.0.1",
        "state_dir": "state",
        "ports": {"hub": hub, "hub_api": hub_api, "proxy_api": proxy_api, "gateway": gateway},
        "users": USERS,
    }
    path = root / "kernelfleet.yaml"
    path.write_text(yaml.safe_dump(config))
    state = root / "state"
    state.mkdir()
    (state / "node").symlink_to(CHP_INSTALL)
    write_password_file(state / "passwords.json", PASSWORDS)
    return path


def wait_until_up(hub: RunningHub, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if hub.process.poll() is not None:
            pytest.fail(f"jupyterhub exited with {hub.process.returncode}:\n{hub.log_tail()}")
        try:
            if httpx.get(f"{hub.url}/hub/api/", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"jupyterhub did not answer within {timeout} s:\n{hub.log_tail()}")


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop(hub: RunningHub, leftover_pids: list[int]) -> None:
    """SIGTERM the hub's process group (it stops servers and proxy), then kill stragglers."""
    try:
        os.killpg(hub.process.pid, signal.SIGTERM)
        hub.process.wait(timeout=15)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(hub.process.pid, signal.SIGKILL)
        hub.process.wait(timeout=5)
    proxy_pid_file = hub.state_dir / "jupyterhub-proxy.pid"
    if proxy_pid_file.exists():
        leftover_pids.append(int(proxy_pid_file.read_text().strip()))
    for pid in leftover_pids:
        kill_pid(pid)


@pytest.fixture(scope="module")
def leftover_pids() -> list[int]:
    return []


@pytest.fixture(scope="module")
def hub(tmp_path_factory, leftover_pids) -> Iterator[RunningHub]:
    if not os.access(chp_path(CHP_INSTALL.parent), os.X_OK):
        pytest.skip(f"needs: npm install --prefix {CHP_INSTALL} configurable-http-proxy@4")
    root = tmp_path_factory.mktemp("hub")
    ports = free_ports(4)
    platform_file = write_platform(root, ports)
    env = {k: v for k, v in os.environ.items() if k != "CONFIGPROXY_AUTH_TOKEN"}
    env["KERNELFLEET_CONFIG"] = str(platform_file)
    log = root / "jupyterhub.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "jupyterhub"),
                "-f",
                str(REPO / "hub" / "jupyterhub_config.py"),
            ],
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = RunningHub(
        url=f"http://127.0.0.1:{ports[0]}",
        api_url=f"http://127.0.0.1:{ports[1]}/hub/api",
        state_dir=root / "state",
        gateway_port=ports[3],
        process=process,
        log=log,
    )
    try:
        wait_until_up(running)
        yield running
    finally:
        stop(running, leftover_pids)


def login(hub: RunningHub, username: str, password: str) -> tuple[httpx.Client, httpx.Response]:
    """Log in like a browser: GET the form for _xsrf, POST it; return the client and answer."""
    client = httpx.Client(base_url=hub.url, timeout=30)
    page = client.get("/hub/login")
    assert page.status_code == 200
    match = re.search(r'name="_xsrf" value="([^"]+)"', page.text)
    assert match, "no _xsrf field on the login page"
    answer = client.post(
        "/hub/login",
        data={"username": username, "password": password, "_xsrf": match.group(1)},
    )
    return client, answer


def assert_refused(client: httpx.Client, answer: httpx.Response) -> None:
    assert answer.status_code == 403
    assert LOGIN_ERROR in answer.text
    assert LOGIN_COOKIE not in client.cookies


def test_wrong_password_shows_the_login_error(hub) -> None:
    assert_refused(*login(hub, "alice", "not-her-password"))


def test_bob_cannot_log_in_with_alices_password(hub) -> None:
    assert_refused(*login(hub, "bob", PASSWORDS["alice"]))


def test_unknown_user_cannot_log_in(hub) -> None:
    assert_refused(*login(hub, "mallory", PASSWORDS["alice"]))


@dataclass
class SpawnedUser:
    client: httpx.Client  # logged in, with the server's cookie
    env: dict[str, str]  # the environment of the server process


def server_process(hub: RunningHub, username: str) -> tuple[int, dict[str, str]]:
    """Pid (from the admin API, as ops) and environment of a user's server process."""
    ops, answer = login(hub, "ops", PASSWORDS["ops"])
    assert answer.status_code == 302
    model = ops.get(f"/hub/api/users/{username}").json()
    pid = model["servers"][""]["state"]["pid"]
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode()
    return pid, dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def wait_for_server(hub: RunningHub, client: httpx.Client, username: str) -> None:
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        # While pending this ends on /hub/spawn-pending/<user>; once ready, OAuth to the
        # server sets its cookie and ends on JupyterLab.
        page = client.get(f"/user/{username}/lab", follow_redirects=True)
        if page.status_code == 200 and page.url.path == f"/user/{username}/lab":
            return
        time.sleep(0.5)
    pytest.fail(f"{username}'s server did not become ready:\n{hub.log_tail()}")


@pytest.fixture(scope="module")
def alice(hub, leftover_pids) -> SpawnedUser:
    """alice, logged in, with her notebook server started through the hub."""
    client, answer = login(hub, "alice", PASSWORDS["alice"])
    assert answer.status_code == 302, hub.log_tail()
    assert answer.headers["location"].endswith("/hub/spawn")
    assert LOGIN_COOKIE in client.cookies
    client.get("/hub/spawn", follow_redirects=True)
    wait_for_server(hub, client, "alice")
    pid, env = server_process(hub, "alice")
    leftover_pids.append(pid)
    return SpawnedUser(client, env)


def test_alices_server_answers_through_the_proxy(hub, alice) -> None:
    # /api/status would ask the gateway for kernels; it is not running in this test.
    me = alice.client.get("/user/alice/api/me")
    assert me.status_code == 200
    assert me.json()["identity"]["username"] == "alice"
    assert alice.client.get("/user/alice/api/contents").status_code == 200


def test_server_token_sees_its_own_name_groups_and_admin(hub, alice) -> None:
    token = alice.env["JUPYTERHUB_API_TOKEN"]
    me = httpx.get(f"{hub.api_url}/user", headers={"Authorization": f"token {token}"})
    assert me.status_code == 200
    model = me.json()
    assert (model["name"], model["groups"], model["admin"]) == ("alice", ["analysts"], False)


def test_server_env_points_at_the_gateway_with_its_own_token(hub, alice) -> None:
    env = alice.env
    assert env["JUPYTER_GATEWAY_URL"] == f"http://127.0.0.1:{hub.gateway_port}"
    assert env["JUPYTER_GATEWAY_AUTH_SCHEME"] == "token"
    assert env["JUPYTER_GATEWAY_AUTH_TOKEN"] == env["JUPYTERHUB_API_TOKEN"]
    assert float(env["JUPYTER_GATEWAY_REQUEST_TIMEOUT"]) > float(env["KERNEL_LAUNCH_TIMEOUT"])
    assert env["JUPYTERHUB_DEFAULT_URL"] == "/lab"
    home = hub.state_dir / "home" / "alice"
    assert env["HOME"] == str(home)
    assert home.stat().st_mode & 0o777 == 0o700
    assert "CONFIGPROXY_AUTH_TOKEN" not in env


def test_gateway_service_token_resolves_users(hub, alice) -> None:
    token = (hub.state_dir / "secrets" / "gateway_service_token").read_text().strip()
    headers = {"Authorization": f"token {token}"}
    whoami = httpx.get(f"{hub.api_url}/user", headers=headers).json()
    assert (whoami["kind"], whoami["name"]) == ("service", "kernelfleet-gateway")
    user = httpx.get(f"{hub.api_url}/users/alice", headers=headers)
    assert user.status_code == 200
    assert user.json()["groups"] == ["analysts"]
    assert httpx.get(f"{hub.api_url}/users", headers=headers).status_code == 200
    # read-only: the gateway's identity cannot stop a user's server
    stop_server = httpx.delete(f"{hub.api_url}/users/alice/server", headers=headers)
    assert stop_server.status_code == 403
