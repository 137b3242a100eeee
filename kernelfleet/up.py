"""``kernelfleet up``: run the whole platform on this machine (the embedded default).

Order matters: Redis (state) → scheduler (policy) → Enterprise Gateway (kernels) →
JupyterHub (users). Everything is checked before anything starts, so a bad config or a
busy port changes nothing. Ctrl-C or SIGTERM stops every process started here.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from . import bootstrap, devsecrets
from .config import PlatformConfig, load_config
from .errors import StartupError
from .kernelspecs.render import InvalidKernelspecs, build_local, check_kernelspecs
from .processes import Component, Supervisor, check_ports_free, http_ok, log_tail
from .redis_settings import TUNING

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_LINE = "kernelfleet is up"


class _Stop(Exception):
    """Raised from the signal handler to unwind into a clean shutdown."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("up", help="run the platform on this machine (Ctrl-C stops)")
    parser.add_argument(
        "--skip-install",
        action="store_true",
        help="do not create or update virtualenvs, Redis or configurable-http-proxy",
    )
    parser.set_defaults(func=run)


def progress(message: str) -> None:
    print(f"  · {message}", flush=True)


def step(number: int, total: int, message: str) -> None:
    print(f"[{number}/{total}] {message}", flush=True)


def _port_settings(config: PlatformConfig) -> dict[str, int]:
    return {f"ports.{name}": port for name, port in config.ports.model_dump().items()}


def _redis(config: PlatformConfig, binary: str) -> Component:
    data = config.state_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        "--port",
        str(config.ports.redis),
        "--bind",
        config.host,
        "--dir",
        str(data),
        "--appendonly",
        "yes",
        "--save",
        "",
        "--daemonize",
        "no",
        "--protected-mode",
        "yes",
        *TUNING,
    ]
    import redis  # the main venv has redis-py; a PING is the readiness check

    client = redis.Redis(host=config.host, port=config.ports.redis, socket_timeout=1)

    def ready() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    return Component("redis", argv, ready, start_timeout=20)


def _scheduler(config: PlatformConfig) -> Component:
    argv = [sys.executable, "-m", "scheduler", "--config", str(config.source)]
    url = f"http://{config.host}:{config.ports.scheduler}/healthz"
    return Component("scheduler", argv, http_ok(url), cwd=REPO_ROOT, start_timeout=30)


def _gateway(config: PlatformConfig, python: Path, kernelspecs: Path) -> Component:
    gateway_config = devsecrets.write_gateway_config(config)
    argv = [str(python), "-m", "gateway.server", f"--config={gateway_config}"]
    env = {
        "JUPYTER_PATH": str(kernelspecs),
        "JUPYTER_RUNTIME_DIR": str(config.state_dir / "runtime" / "gateway"),
    }
    url = f"http://{config.host}:{config.ports.gateway}/api"
    return Component(
        "gateway", argv, http_ok(url, ok=(200, 401)), env=env, cwd=REPO_ROOT, start_timeout=60
    )


def _hub(config: PlatformConfig) -> Component:
    hub_config = REPO_ROOT / "hub" / "jupyterhub_config.py"
    argv = [str(Path(sys.executable).parent / "jupyterhub"), "-f", str(hub_config)]
    env = {
        "KERNELFLEET_CONFIG": str(config.source),
        "CONFIGPROXY_AUTH_TOKEN": devsecrets.read_secret(config, "proxy_token"),
        "KERNELFLEET_CHP": str(bootstrap.chp_path(REPO_ROOT)),
    }
    url = f"http://{config.host}:{config.ports.hub}/hub/api/"
    return Component("hub", argv, http_ok(url), env=env, cwd=config.state_dir, start_timeout=60)


def validate(config: PlatformConfig) -> list[str]:
    """Everything a user can get wrong, checked before anything is installed or written."""
    check_ports_free(config.host, _port_settings(config), source=config.source)
    checked = check_kernelspecs(config)
    if checked.errors:
        raise InvalidKernelspecs(checked.problems)
    return list(checked.specs)


def prepare(config: PlatformConfig, *, install: bool) -> dict[str, Path | str]:
    """Everything before processes start: environments, secrets, kernelspecs."""
    step(1, 5, "environments (virtualenvs, Redis, configurable-http-proxy)")
    tools: dict[str, Path | str] = {}
    if install:
        tools.update(bootstrap.ensure_environments(REPO_ROOT, progress=progress))
        tools["redis"] = bootstrap.ensure_redis(progress=progress)
        tools["chp"] = bootstrap.ensure_chp(REPO_ROOT, progress=progress)
    else:
        tools["gateway"] = REPO_ROOT / ".venv-gateway" / "bin" / "python"
        tools["redis"] = bootstrap.find_redis_server()
    step(2, 5, "secrets and demo logins")
    devsecrets.ensure_secrets(config)
    devsecrets.ensure_demo_logins(config)
    step(3, 5, "kernelspecs")
    tools["kernelspecs"] = build_local(config, config.state_dir / "kernelspecs" / "local")
    return tools


def start(config: PlatformConfig, supervisor: Supervisor, tools: dict[str, Path | str]) -> None:
    """Start the processes in dependency order."""
    step(4, 5, "starting Redis, scheduler, Enterprise Gateway, JupyterHub")
    kernelspec_root = Path(tools["kernelspecs"])
    for component in (
        _redis(config, str(tools["redis"])),
        _scheduler(config),
        _gateway(config, Path(tools["gateway"]), kernelspec_root),
        _hub(config),
    ):
        began = time.monotonic()
        supervisor.start(component)
        progress(f"{component.name} ready in {time.monotonic() - began:.1f} s")


def announce(config: PlatformConfig) -> None:
    step(5, 5, "ready")
    logins = devsecrets.demo_logins_file(config)
    print(f"\n{READY_LINE}: http://{config.host}:{config.ports.hub}", flush=True)
    print(f"Demo logins (also in {logins}):")
    for line in logins.read_text().splitlines():
        user, _, password = line.partition(" ")
        print(f"  {user:<8} {password}")
    print("Press Ctrl-C to stop.", flush=True)


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop()


def run(args: argparse.Namespace) -> int:
    """Prepare, start, wait until a signal or a crash, stop everything."""
    config = load_config(args.config)
    specs = validate(config)
    tools = prepare(config, install=not args.skip_install)
    progress(f"{len(specs)} kernelspecs: {', '.join(specs)}")
    supervisor = Supervisor(config.state_dir / "logs", progress=progress)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        start(config, supervisor, tools)
        announce(config)
        while (crashed := supervisor.first_exited()) is None:
            time.sleep(0.5)
        raise StartupError(
            f"{crashed.name} stopped unexpectedly; last lines of {crashed.log}:\n"
            f"{log_tail(crashed.log) if crashed.log else ''}"
        )
    except _Stop:
        print("\nstopping kernelfleet ...", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        supervisor.stop_all()
        print("kernelfleet stopped.", flush=True)
