"""``python -m scheduler --config kernelfleet.yaml``: run the scheduler service.

It listens on ``host``:``ports.scheduler`` of kernelfleet.yaml and keeps its state in
Redis at 127.0.0.1:``ports.redis`` (``--redis-url`` overrides). The service token is
read from ``<state_dir>/secrets/scheduler_token`` (``--token-file`` overrides); it is
never logged nor accepted on the command line. Start-up problems (bad config, missing
token, port in use) print one line and exit with status 2. Redis being down is not a
start-up problem: the scheduler answers 503 until it is back.

Background loops start with it (:mod:`scheduler.loops`): queue time-outs and promotions
always; reconciliation with Enterprise Gateway at ``http://{host}:{ports.gateway}``
(``--gateway-url``) when the gateway's service token file exists
(``<state_dir>/secrets/gateway_service_token``, ``--gateway-token-file``). Users' hub
tokens are resolved at ``http://{host}:{ports.hub_api}/hub/api`` (``--hub-api-url``;
empty: only the service token is accepted).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from kernelfleet.config import DEFAULT_CONFIG, PlatformConfig, load_config
from kernelfleet.errors import KernelfleetError, StartupError
from kernelfleet.kernelspecs.spec import KernelSpec, load_kernelspecs

from .app import create_app
from .auth import HubTokenResolver
from .errors import RedisUnavailable
from .eviction import Evictor
from .eviction_policy import PRESSURE_GRACE_S, PRESSURE_WARNING_S
from .loops import Loops
from .pools import resolve_pools
from .reconcile import KERNEL_GRACE_S, LEASE_GRACE_S, EnterpriseGatewayClient, Reconciler
from .service import Scheduler
from .store import connect, describe

if TYPE_CHECKING:
    from .kubernetes import KubernetesBackend

log = logging.getLogger("scheduler")

TOKEN_FILE = Path("secrets") / "scheduler_token"
GATEWAY_TOKEN_FILE = Path("secrets") / "gateway_service_token"


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
        "--gateway-url",
        help="Enterprise Gateway, for reconciliation (default: http://<host>:<ports.gateway>)",
    )
    parser.add_argument(
        "--gateway-token-file",
        type=Path,
        help="the gateway's hub service token, an admin identity on EG (default: "
        "<state_dir>/secrets/gateway_service_token; missing: no reconciliation)",
    )
    parser.add_argument(
        "--hub-api-url",
        help="JupyterHub API for users' own tokens (default: http://<host>:<ports.hub_api>"
        "/hub/api; '' accepts only the service token)",
    )
    parser.add_argument(
        "--reconcile-interval",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="seconds between reconciliation rounds (default: %(default)s)",
    )
    parser.add_argument(
        "--lease-grace",
        type=float,
        default=LEASE_GRACE_S,
        metavar="SECONDS",
        help="release a lease whose kernel EG does not run after this long (default: %(default)s)",
    )
    parser.add_argument(
        "--kernel-grace",
        type=float,
        default=KERNEL_GRACE_S,
        metavar="SECONDS",
        help="stop a kernel EG runs without a lease after this long (default: %(default)s)",
    )
    parser.add_argument(
        "--eviction-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="warn and stop idle kernels this often (default: %(default)s)",
    )
    parser.add_argument(
        "--pressure-grace",
        type=float,
        default=PRESSURE_GRACE_S,
        metavar="SECONDS",
        help="a full pool with a queue evicts its longest-idle kernel idle at least this long "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--pressure-warning",
        type=float,
        default=PRESSURE_WARNING_S,
        metavar="SECONDS",
        help="warning before a pressure eviction (default: %(default)s)",
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
        # Accepted sockets inherit it. asyncio sets TCP_NODELAY only on sockets whose proto
        # is IPPROTO_TCP (create_server's is 0), and uvicorn writes a response's headers and
        # body separately: with Nagle on, every keep-alive request waited ~40 ms for an ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
    gateway_url: str
    gateway_token: str | None
    hub_api_url: str
    reconcile_interval_s: float = 15.0
    lease_grace_s: float = LEASE_GRACE_S
    kernel_grace_s: float = KERNEL_GRACE_S
    eviction_interval_s: float = 5.0
    pressure_grace_s: float = PRESSURE_GRACE_S
    pressure_warning_s: float = PRESSURE_WARNING_S


def _gateway_token(args: argparse.Namespace, platform: PlatformConfig) -> str | None:
    """The gateway's service token, or None (no reconciliation) if its file is missing."""
    path = args.gateway_token_file or platform.state_dir / GATEWAY_TOKEN_FILE
    if args.gateway_token_file is None and not path.exists():
        return None
    return read_token(path)


def prepare(args: argparse.Namespace) -> Startup:
    """Load config, kernelspecs and tokens; raise KernelfleetError naming what is wrong."""
    platform = load_config(args.config)
    hub_api = f"{_url(platform.host, platform.ports.hub_api)}/hub/api"
    return Startup(
        platform=platform,
        token=read_token(args.token_file or platform.state_dir / TOKEN_FILE),
        kernelspecs=load_kernelspecs(platform.kernelspecs_dir, platform),
        redis_url=args.redis_url or f"redis://127.0.0.1:{platform.ports.redis}/0",
        gateway_url=args.gateway_url or _url(platform.host, platform.ports.gateway),
        gateway_token=_gateway_token(args, platform),
        hub_api_url=hub_api if args.hub_api_url is None else args.hub_api_url,
        reconcile_interval_s=args.reconcile_interval,
        lease_grace_s=args.lease_grace,
        kernel_grace_s=args.kernel_grace,
        eviction_interval_s=args.eviction_interval,
        pressure_grace_s=args.pressure_grace,
        pressure_warning_s=args.pressure_warning,
    )


def _loops(startup: Startup, scheduler: Scheduler) -> tuple[Loops, EnterpriseGatewayClient | None]:
    """The background loops; reconciliation only with the gateway's token."""
    if startup.gateway_token is None:
        log.warning("no gateway service token: reconciliation with Enterprise Gateway is off")
        return Loops(scheduler), None
    gateway = EnterpriseGatewayClient(startup.gateway_url, startup.gateway_token)
    reconciler = Reconciler(scheduler, gateway, lease_grace_s=startup.lease_grace_s,
                            kernel_grace_s=startup.kernel_grace_s)  # fmt: skip
    log.info("reconciling with Enterprise Gateway at %s every %s s", startup.gateway_url,
             startup.reconcile_interval_s)  # fmt: skip
    evictor = Evictor(scheduler, gateway, kernelspecs=startup.kernelspecs,
                      pressure_grace_s=startup.pressure_grace_s,
                      pressure_warning_s=startup.pressure_warning_s,
                      exclusive_s=startup.eviction_interval_s * 0.8)  # fmt: skip
    return Loops(scheduler, reconciler=reconciler, evictor=evictor,
                 reconcile_interval_s=startup.reconcile_interval_s,
                 eviction_interval_s=startup.eviction_interval_s), gateway  # fmt: skip


async def serve(startup: Startup, sock: socket.socket, *, log_level: str = "info") -> None:
    """Build the scheduler and serve it on ``sock`` until told to stop."""
    platform = startup.platform
    kube = await _kubernetes_backend(startup)  # None unless backend: kubernetes
    pools = kube.pools if kube else resolve_pools(platform)
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
        await scheduler.ensure_layout()  # else the queue step does it once Redis answers
    except RedisUnavailable as e:
        log.warning("%s Serving 503 until it answers.", e.message)
    resolver = HubTokenResolver(startup.hub_api_url) if startup.hub_api_url else None
    served = kube.attach(scheduler) if kube else scheduler
    app = create_app(served, token=startup.token, resolver=resolver)  # type: ignore[arg-type]
    if kube:
        kube.add_routes(app)
    config = uvicorn.Config(
        app,
        log_config=None,
        log_level=log_level,
        lifespan="off",
        http="httptools",  # C parser: h11 (pure Python) cost ~30% more CPU per request
        # longer than clients keep idle connections (the gateway: 2 s), so a client never
        # sends on a connection the server is closing
        timeout_keep_alive=30,
    )
    server = uvicorn.Server(config)
    url = _url(platform.host, platform.ports.scheduler)
    loops, gateway = _loops(startup, scheduler)
    loops.start()
    # What start-up built (modules, config, kernelspecs, the app) lives as long as the
    # process: moved out of the collector's generations, a full collection no longer walks
    # it. Such collections paused admissions for up to ~180 ms in the bench.
    gc.collect()
    gc.freeze()
    announce = asyncio.create_task(_announce(server, url))
    try:
        await server.serve(sockets=[sock])
    finally:
        announce.cancel()
        await loops.stop()
        for client in (gateway, resolver, kube):
            if client is not None:
                await client.aclose()
        await redis.aclose()


async def _kubernetes_backend(startup: Startup) -> KubernetesBackend | None:
    """Pools from nodes, pod watch and placeholders (scheduler.kubernetes), or None."""
    if startup.platform.backend != "kubernetes":
        return None
    from .kubernetes import KubernetesBackend  # only this backend needs kubernetes_asyncio
    from .kubernetes_watch import KubernetesError

    try:
        return await KubernetesBackend.start(startup.platform, startup.kernelspecs)
    except (KubernetesError, OSError) as e:
        print(f"scheduler: cannot read the pools' nodes from Kubernetes: {e}", file=sys.stderr)
        raise SystemExit(2) from e


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scheduler; 2 with one line on stderr when it cannot start."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.log_level != "debug":  # httpx logs every call to EG and the hub at INFO
        logging.getLogger("httpx").setLevel(logging.WARNING)
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
