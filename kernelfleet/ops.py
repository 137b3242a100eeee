"""``kernelfleet pools | kernels | quota USER``: what the scheduler sees, as tables for ops.

The commands ask the scheduler's HTTP API (``http://{host}:{ports.scheduler}`` of
kernelfleet.yaml, or ``--scheduler-url``) with the service token from
``<state_dir>/secrets/scheduler_token``; they never read Redis themselves.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from .config import load_config
from .errors import KernelfleetError

TIMEOUT_S = 10.0
_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``pools``, ``kernels`` and ``quota``."""
    pools = subparsers.add_parser("pools", help="pools: capacity, use, leases, queue, cost")
    pools.set_defaults(func=run_pools)
    kernels = subparsers.add_parser("kernels", help="kernels holding leases, oldest first")
    kernels.add_argument("--user", help="only this user's kernels")
    kernels.add_argument("--pool", help="only kernels in this pool")
    kernels.add_argument("--kernelspec", help="only kernels of this kernelspec")
    kernels.add_argument(
        "--state", choices=["starting", "idle", "busy", "stopped"],
        help="only kernels in this state (stopped: those stopped in the last hour)",
    )  # fmt: skip
    kernels.set_defaults(func=run_kernels)
    quota = subparsers.add_parser("quota", help="a user's usage against their quota")
    quota.add_argument("user", help="the user name")
    quota.set_defaults(func=run_quota)
    for parser in (pools, kernels, quota):
        parser.add_argument(
            "--scheduler-url",
            help="the scheduler (default: http://<host>:<ports.scheduler> of the config)",
        )


# -- formatting ------------------------------------------------------------------------------


def number(value: float) -> str:
    """2.0 -> "2", 1.5 -> "1.5"."""
    return str(int(value)) if float(value) == int(value) else f"{value:.2f}".rstrip("0")


def memory(value: int) -> str:
    """Bytes in the largest binary unit that keeps at least 1."""
    for unit, size in _UNITS:
        if value >= size:
            return f"{number(round(value / size, 1))} {unit}"
    return f"{value} B"


def duration(seconds: float) -> str:
    """A short age: 42s, 5m, 2h05m, 3d04h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def limit(value: float | None, *, bytes_: bool = False) -> str:
    """A quota limit; None is unlimited."""
    if value is None:
        return "unlimited"
    return memory(int(value)) if bytes_ else number(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Rows under headers, columns padded to their widest cell."""
    cells = [list(headers)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


# -- scheduler API ---------------------------------------------------------------------------


class SchedulerAPI:
    """A small client for the scheduler's /v1 API with the service token."""

    def __init__(self, url: str, token: str, *, transport: httpx.BaseTransport | None = None):
        self.url = url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.url, timeout=TIMEOUT_S, transport=transport,
            headers={"Authorization": f"token {token}"},
        )  # fmt: skip

    def get(self, path: str, **params: Any) -> Any:
        """GET ``path``; KernelfleetError with the scheduler's message when it fails."""
        return self.request("GET", path, params=params)

    def request(
        self, method: str, path: str, *, params: dict[str, Any] | None = None, json: Any = None
    ) -> Any:
        """``method path``; the JSON answer, or KernelfleetError with the scheduler's message."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self._client.request(method, path, params=query, json=json)
        except httpx.HTTPError as e:
            raise KernelfleetError(
                f"The scheduler at {self.url} is unreachable ({type(e).__name__}); "
                "is `kernelfleet up` running?"
            ) from e
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200:
            message = body.get("message") if isinstance(body, dict) else None
            raise KernelfleetError(
                f"The scheduler answered {response.status_code}: {message or response.text[:200]}"
            )
        return body

    def close(self) -> None:
        """Close the connection."""
        self._client.close()


def _api(args: argparse.Namespace) -> SchedulerAPI:
    config = load_config(args.config)
    token_file: Path = config.state_dir / "secrets" / "scheduler_token"
    try:
        token = token_file.read_text().strip()
    except OSError as e:
        raise KernelfleetError(
            f"Cannot read the scheduler's token {token_file} ({e.strerror}); "
            "run `kernelfleet up` once to create it."
        ) from e
    url = args.scheduler_url or f"http://{config.host}:{config.ports.scheduler}"
    return SchedulerAPI(url, token)


# -- commands --------------------------------------------------------------------------------


def pools_table(pools: list[dict[str, Any]]) -> str:
    """``GET /v1/pools`` as a table."""
    rows = []
    for pool in pools:
        cap, used, states = pool["capacity"], pool["used"], pool.get("states", {})
        gpus = f"{used['gpus']}/{cap['gpus']}" + (" (sim)" if pool["simulated_gpus"] else "")
        rows.append([
            pool["name"], f"{number(used['cpus'])}/{number(cap['cpus'])}",
            f"{memory(used['memory'])}/{memory(cap['memory'])}", gpus, pool["kernels"],
            states.get("starting", 0), states.get("idle", 0), states.get("busy", 0),
            pool.get("queued", 0), f"{pool['cost_per_hour']:.2f}",
        ])  # fmt: skip
    headers = ["POOL", "CPUS", "MEMORY", "GPUS", "KERNELS", "STARTING", "IDLE", "BUSY",
               "QUEUED", "$/HOUR"]  # fmt: skip
    return table(headers, rows)


def kernels_table(leases: list[dict[str, Any]], *, now: float) -> str:
    """``GET /v1/leases`` as a table; ages and idle times relative to ``now``."""
    rows = [
        [
            lease["kernel_id"], lease["user"], lease["kernelspec"], lease["pool"],
            lease["state"] if lease["state"] != "stopped"
            else f"stopped ({lease.get('stop_reason') or '?'})",
            number(lease["cpus"]), memory(lease["memory"]),
            ",".join(str(d) for d in lease["gpu_devices"]) or "-",
            duration(now - lease["created"]), duration(now - lease["last_activity"]),
            lease.get("connections", 0),
        ]
        for lease in leases
    ]  # fmt: skip
    headers = ["KERNEL", "USER", "KERNELSPEC", "POOL", "STATE", "CPUS", "MEMORY", "GPUS",
               "AGE", "IDLE", "CONNECTIONS"]  # fmt: skip
    return table(headers, rows) if rows else "No kernels."


def quota_report(usage: dict[str, Any], queue: dict[str, Any]) -> str:
    """``GET /v1/users/{user}/usage`` and ``.../queue`` as a short report."""
    quota, used = usage["quota"], usage["used"]
    groups = ", ".join(usage["groups"]) or "none"
    rows = [
        ["kernels", used["kernels"], limit(quota["kernels"])],
        ["cpus", number(used["cpus"]), limit(quota["cpus"])],
        ["memory", memory(used["memory"]), limit(quota["memory"], bytes_=True)],
        ["gpus", used["gpus"], limit(quota["gpus"])],
        ["gpu-hours (24 h)", number(used["gpu_hours"]), limit(quota["gpu_hours_per_day"])],
    ]
    lines = [f"User {usage['user']} (groups: {groups})", "", table(["", "USED", "LIMIT"], rows)]
    entries = queue.get("entries", [])
    if entries:
        lines += ["", "Waiting:"]
        lines += [f"  {e['kernelspec']} ({e['kernel_id']}): {e['message']}" for e in entries]
    return "\n".join(lines)


def run_pools(args: argparse.Namespace) -> int:
    api = _api(args)
    try:
        print(pools_table(api.get("/v1/pools")["pools"]))
    finally:
        api.close()
    return 0


def run_kernels(args: argparse.Namespace) -> int:
    api = _api(args)
    try:
        found = api.get("/v1/leases", user=args.user, pool=args.pool,
                        kernelspec=args.kernelspec, state=args.state)  # fmt: skip
        print(kernels_table(found["leases"], now=time.time()))
    finally:
        api.close()
    return 0


def run_quota(args: argparse.Namespace) -> int:
    api = _api(args)
    try:
        user = quote(args.user, safe="")
        usage = api.get(f"/v1/users/{user}/usage")
        queue = api.get(f"/v1/users/{user}/queue")
        print(quota_report(usage, queue))
    finally:
        api.close()
    return 0
