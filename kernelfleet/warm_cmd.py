"""``kernelfleet warm``: list warm-pool targets; ``warm set KERNELSPEC N``; ``warm reset``."""

from __future__ import annotations

import argparse
from typing import Any
from urllib.parse import quote

from .ops import _api, table


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``warm`` with ``set`` and ``reset``."""
    warm = subparsers.add_parser("warm", help="warm pools: targets per kernelspec")
    warm.set_defaults(func=run_list)
    actions = warm.add_subparsers(dest="warm_action", metavar="ACTION")
    pin = actions.add_parser("set", help="pin a kernelspec's warm target (kept across restarts)")
    pin.add_argument("kernelspec")
    pin.add_argument("target", type=int)
    pin.set_defaults(func=run_set)
    reset = actions.add_parser("reset", help="back to the target in the kernelspec's spec.yaml")
    reset.add_argument("kernelspec")
    reset.set_defaults(func=run_reset)
    for parser in (warm, pin, reset):
        parser.add_argument(
            "--scheduler-url",
            help="the scheduler (default: http://<host>:<ports.scheduler> of the config)",
        )


def targets_table(targets: list[dict[str, Any]]) -> str:
    """One row per kernelspec: pool, target, where it comes from, warm kernels now, spec
    default, pool limit."""
    headers = ["KERNELSPEC", "POOL", "TARGET", "SOURCE", "READY", "SPEC", "MOST"]
    rows = [[t["kernelspec"], t["pool"], t["target"], t["source"], t.get("ready", 0),
             t["spec_target"], t["most"]] for t in targets]  # fmt: skip
    return table(headers, rows) if rows else "No kernelspecs."


def run_list(args: argparse.Namespace) -> int:
    api = _api(args)
    try:
        print(targets_table(api.get("/v1/warm-pools")["warm_pools"]))
    finally:
        api.close()
    return 0


def _change(args: argparse.Namespace, method: str, body: Any = None) -> int:
    api = _api(args)
    try:
        path = f"/v1/warm-pools/{quote(args.kernelspec, safe='')}"
        print(targets_table([api.request(method, path, json=body)]))
    finally:
        api.close()
    return 0


def run_set(args: argparse.Namespace) -> int:
    return _change(args, "PUT", {"target": args.target})


def run_reset(args: argparse.Namespace) -> int:
    return _change(args, "DELETE")
