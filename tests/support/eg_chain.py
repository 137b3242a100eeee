"""A real scheduler process and a real Enterprise Gateway wired together, hub API stood in.

The chain tests (eviction, warm pools) need what a platform runs minus the hub: Redis, a
``python -m scheduler`` process reading a kernelfleet.yaml, and EG with gateway.server
talking to it with the service token. The hub API is the stand-in of
tests/support/gateway_stack.py (its tokens: ALICE, BOB, CAROL, GATEWAY_SERVICE).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tests.support.gateway_stack import (
    GATEWAY_SERVICE,
    SCHEDULER_TOKEN,
    Gateway,
    HubAPIStandIn,
    serve_stand_in,
)
from tests.support.ports import free_port
from tests.support.redis_server import running_redis
from tests.support.scheduler_stack import Stack

REPO = Path(__file__).resolve().parents[2]


def kernelspecs_with(folder: Path, changes: Callable[[str, dict[str, Any]], None]) -> Path:
    """A copy of the repository's kernelspecs under ``folder``; ``changes(name, spec)`` edits
    each spec.yaml's content in place."""
    specs = folder / "kernelspecs"
    shutil.copytree(REPO / "kernelspecs", specs)
    for spec_file in sorted(specs.glob("*/spec.yaml")):
        spec = yaml.safe_load(spec_file.read_text())
        changes(spec_file.parent.name, spec)
        spec_file.write_text(yaml.safe_dump(spec))
    return specs


@contextmanager
def scheduler_and_gateway(
    folder: Path, kernelspecs: Path, *, gateway_config: str = "",
    scheduler_args: Sequence[str] = (), platform: dict[str, Any] | None = None,
) -> Iterator[tuple[Gateway, Stack]]:  # fmt: skip
    """Redis, the scheduler and EG on free ports; all stopped on exit. ``platform``: more
    kernelfleet.yaml settings (quotas, say)."""
    hub, hub_port = serve_stand_in(HubAPIStandIn)
    scheduler_port = free_port()
    gateway = Gateway(folder / "gateway", hub_port, scheduler_port, extra_config=gateway_config)
    try:
        with running_redis(folder / "redis") as redis:
            config = {
                "host": "127.0.0.1", "state_dir": "state", "kernelspecs_dir": str(kernelspecs),
                "ports": {"scheduler": scheduler_port, "redis": redis.port,
                          "gateway": gateway.port, "hub_api": hub_port},
                "pools": {"cpu": {"cpus": 8, "memory": "32Gi"},
                          "gpu": {"cpus": 8, "memory": "32Gi", "gpus": 2,
                                  "simulated_gpus": True}},
                **(platform or {}),
            }  # fmt: skip
            (folder / "kernelfleet.yaml").write_text(yaml.safe_dump(config))
            secrets = folder / "state" / "secrets"
            secrets.mkdir(parents=True)
            (secrets / "scheduler_token").write_text(SCHEDULER_TOKEN)
            (secrets / "gateway_service_token").write_text(GATEWAY_SERVICE)
            scheduler = Stack(folder=folder, redis=redis, port=scheduler_port,
                              extra_args=list(scheduler_args))  # fmt: skip
            scheduler.start()
            try:
                yield gateway, scheduler
            finally:
                gateway.stop()
                scheduler.stop()
    finally:
        gateway.stop()
        hub.shutdown()
        hub.server_close()
