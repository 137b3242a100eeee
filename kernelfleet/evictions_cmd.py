"""``kernelfleet evictions``: the kernels the scheduler stopped, newest first, and why."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .ops import _api, duration, table


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``evictions``."""
    parser = subparsers.add_parser("evictions", help="kernels stopped for idleness or pressure")
    parser.add_argument("--user", help="only this user's evictions")
    parser.add_argument("--limit", type=int, default=50, help="how many (default: %(default)s)")
    parser.add_argument(
        "--scheduler-url",
        help="the scheduler (default: http://<host>:<ports.scheduler> of the config)",
    )
    parser.set_defaults(func=run_evictions)


def evictions_table(evictions: list[dict[str, Any]]) -> str:
    """One row per eviction: when, kernel, user, kernelspec, reason, idle, GPUs, GPU-hours."""
    headers = ["STOPPED", "KERNEL", "USER", "KERNELSPEC", "REASON", "IDLE", "GPUS", "GPU-H FREED"]
    rows = [
        [time.strftime("%Y-%m-%d %H:%M", time.localtime(e["at"])), e["kernel_id"], e["user"],
         e["kernelspec"], e["reason"], duration(e["idle_s"]), e["gpus"],
         f"{e['gpu_hours_freed']:.2f}"]
        for e in evictions
    ]  # fmt: skip
    return table(headers, rows) if rows else "No evictions."


def run_evictions(args: argparse.Namespace) -> int:
    api = _api(args)
    try:
        found = api.get("/v1/evictions", user=args.user, limit=args.limit)
        print(evictions_table(found["evictions"]))
    finally:
        api.close()
    return 0
