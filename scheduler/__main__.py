"""``python -m scheduler --config kernelfleet.yaml``: run the scheduler service.

It listens on ``host``:``ports.scheduler`` of kernelfleet.yaml and keeps its state in
Redis at 127.0.0.1:``ports.redis`` (``--redis-url`` overrides). The service token is
read from ``<state_dir>/secrets/scheduler_token`` (``--token-file`` overrides); it is
never logged nor accepted on the command line. Start-up problems (bad config, missing
token, port in use) print one line and exit with status 2. Redis being down is not a
start-up problem: the scheduler answers 503 until it is back.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from kernelfleet.config import DEFAULT_CONFIG, PlatformConfig, load_config
from kernelfleet.errors import KernelfleetError, StartupError
from kernelfleet.kernelspecs.spec import KernelSpec, load_kernelspecs

from .app import create_app
from .errors import RedisUnavailable
from .pools import resolve_pools
from .service import Scheduler
from .store import connect, describe

log = logging.getLogger("scheduler")

TOKEN_FILE = Path("secrets") / "scheduler_token"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m scheduler", description="kernelfleet scheduler: admission and leases."
    )
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help="kernelfleet.yaml (default: %(default)s)"
    )
    parser.add_argument(
        "--redis-url",
        help="Redis to keep state in (default: redis://127.0.0.1:<ports.redis>/0)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        help="file holding the service token (default: <state_dir>/secrets/scheduler_token)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    return parser.parse_args(argv)


def read_token(path: Path) -> str:
    """The service token in ``path``; StartupError if it is missing or empty."""
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise StartupError(
            f"Service token file {path} not found; run `kernelfleet up` once to generate it, "
            "or pass --token-file."
        ) from None
    except OSError as e:
        raise StartupError(f"Cannot read the service token file {path}: {e.strerror}.") from e
    if not token:
        raise StartupError(f"Service token file {path} is empty; put the token in it.")
    return token


def listen(platform: PlatformConfig) -> socket.socket:
    """A listening socket on host:ports.scheduler, or StartupError saying what to change."""
    host, port = platform.host, platform.ports.scheduler
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((host, port), family=family, backlog=1024)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise StartupError(
                f"Port {port} (ports.scheduler in {platform.source.name}) is in use; "
                "stop what uses it or change ports.scheduler."
            ) from e
        raise StartupError(
            f"Cannot listen on {host}:{port} (host, ports.scheduler in "
            f"{platform.source.name}): {e.strerror or e}."
        ) from e
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _announce(server: uvicorn.Server, url: str) -> None:
    """Print the ready line once uvicorn serves."""
    while not server.started:
        await asyncio.sleep(0.02)
    print(f"scheduler ready on {url}", flush=True)


@dataclass(frozen=True)
class Startup:
    """Everything checked before serving, so start-up fails before the port is taken."""

    platform: PlatformConfig
    token: str
    kernelspecs: dict[str, KernelSpec]
    redis_url: str


def prepare(args: argparse.Namespace) -> Startup:
    """Load config, kernelspecs and token; raise KernelfleetError naming what is wrong."""
    platform = load_config(args.config)
    return Startup(
        platform=platform,
        token=read_token(args.token_file or platform.state_dir / TOKEN_FILE),
        kernelspecs=load_kernelspecs(platform.kernelspecs_dir, platform),
        redis_url=args.redis_url or f"redis://127.0.0.1:{platform.ports.redis}/0",
    )


async def serve(startup: Startup, sock: socket.socket, *, log_level: str = "info") -> None:
    """Build the scheduler and serve it on ``sock`` until told to stop."""
    platform = startup.platform
    pools = resolve_pools(platform)
    for pool in pools.values():
        log.info("pool %s: capacity %s, simulated GPUs: %s", pool.name, pool.capacity(),
                 pool.simulated_gpus)  # fmt: skip
    redis = connect(startup.redis_url)
    scheduler = Scheduler.from_config(
        redis, platform, pools=pools, kernelspecs=startup.kernelspecs,
        location=describe(startup.redis_url),
    )  # fmt: skip
    try:
        await scheduler.ping()
    except RedisUnavailable as e:
        log.warning("%s Serving 503 until it answers.", e.message)
    app = create_app(scheduler, token=startup.token)
    config = uvicorn.Config(app, log_config=None, log_level=log_level, lifespan="off")
    server = uvicorn.Server(config)
    url = _url(platform.host, platform.ports.scheduler)
    announce = asyncio.create_task(_announce(server, url))
    try:
        await server.serve(sockets=[sock])
    finally:
        announce.cancel()
        await redis.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scheduler; 2 with one line on stderr when it cannot start."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        startup = prepare(args)
        sock = listen(startup.platform)
    except KernelfleetError as e:
        print(f"scheduler: {e}", file=sys.stderr)
        return 2
    try:
        with sock:
            asyncio.run(serve(startup, sock, log_level=args.log_level))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
