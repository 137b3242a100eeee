"""``python -m bench``: measure kernelfleet against the stock stack on this machine.

    python -m bench                              # everything (the lead's full run)
    python -m bench --only latency,admission --quick
    python -m bench --only users --users 20 --timeout 600

Writes ``bench/results/<timestamp>.json`` and ``bench/results/latest.md`` (see
bench/README.md). The run is bounded by ``--timeout``; each phase gets a deadline within
it, and every process the run started is stopped before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from . import admission, latency, scale, users
from .chains import CHAIN_LABELS, Chains
from .context import Context
from .machine import describe
from .report import write_results
from .runtime import Budget, Reaper, Watchdog, progress

Phase = Callable[[Context, dict[str, Any]], Awaitable[None]]
#: In this order: the phases that start no chain run first, on a machine that no chain's
#: hub, gateway and kernels share yet (the chains stay up from the latency phase to the
#: users phase, which reuses kernelfleet's; their background work made the admission
#: figures' tails two to three times longer when admission ran after latency).
PHASES: dict[str, Phase] = {
    "admission": admission.run,
    "scale": scale.run,
    "latency": latency.run,
    "users": users.run,
}
#: Seconds each phase may take: (full run, --quick run).
PHASE_BUDGET_S = {"latency": (420, 200), "admission": (180, 60), "scale": (120, 60),
                  "users": (720, 300)}  # fmt: skip
DEFAULT_TIMEOUT_S = (1500, 600)
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _names(value: str, known: Sequence[str], what: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}"
        )
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--only", type=lambda v: _names(v, list(PHASES), "phase"),
                        default=list(PHASES), help="comma-separated phases (default: all): "
                        + ", ".join(PHASES))  # fmt: skip
    parser.add_argument("--chains", type=lambda v: _names(v, list(CHAIN_LABELS), "chain"),
                        default=list(CHAIN_LABELS), help="chains the latency phase measures "
                        "(default: all): " + ", ".join(CHAIN_LABELS))  # fmt: skip
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer samples and shorter deadlines (development runs)",
    )
    parser.add_argument(
        "--users",
        type=int,
        default=None,
        help="simulated users of the users phase (default: 50, --quick: 10)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds the whole run may take (default: 1500, --quick: 600)",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where <timestamp>.json and latest.md go (default: bench/results)",
    )
    parser.add_argument(
        "--keep-workdir",
        action="store_true",
        help="keep the scratch folder (server logs) instead of deleting it",
    )
    args = parser.parse_args(argv)
    if args.timeout is None:
        args.timeout = DEFAULT_TIMEOUT_S[1 if args.quick else 0]
    if args.users is None:
        args.users = 10 if args.quick else 50
    if args.users < 1:
        parser.error("--users must be at least 1")
    return args


async def _run_phase(name: str, ctx: Context, run: dict[str, Any]) -> None:
    """One phase within its deadline; its failure is recorded, never raised."""
    results: dict[str, Any] = run["phases"].setdefault(name, {})
    limit = ctx.budget.phase_limit(PHASE_BUDGET_S[name][1 if ctx.quick else 0])
    began = time.monotonic()
    ctx.phase_ends = began + limit
    progress(f"phase {name} (deadline {limit:.0f} s)")
    try:
        if limit <= 0:
            raise TimeoutError
        async with asyncio.timeout(limit):
            await PHASES[name](ctx, results)
    except TimeoutError:
        run["errors"][name] = f"stopped at its deadline ({limit:.0f} s); partial results kept"
    except Exception as e:  # a broken phase must not stop the others
        run["errors"][name] = f"{type(e).__name__}: {e}"
        (ctx.workdir / f"{name}.traceback.txt").write_text(traceback.format_exc())
    results["seconds"] = round(time.monotonic() - began, 1)
    progress(f"phase {name} done in {results['seconds']} s"
             + (f" - {run['errors'][name]}" if name in run["errors"] else ""))  # fmt: skip


async def run_bench(
    args: argparse.Namespace,
    run: dict[str, Any],
    budget: Budget,
    workdir: Path,
    reaper: Reaper | None = None,
) -> None:
    """Every selected phase, then every chain stopped; results collected into ``run``."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel if task else (lambda: None))
    chains = Chains(workdir, users=args.users, deadline=budget.remaining)
    ctx = Context(workdir=workdir, budget=budget, chains=chains, quick=args.quick,
                  users=args.users, chain_keys=args.chains, reaper=reaper)  # fmt: skip
    try:
        for name in [phase for phase in PHASES if phase in args.only]:  # PHASES' order
            await _run_phase(name, ctx, run)
    except asyncio.CancelledError:
        run["errors"]["run"] = "interrupted (SIGINT/SIGTERM); partial results kept"
    finally:
        progress("stopping every chain")
        try:
            await asyncio.wait_for(asyncio.shield(chains.aclose()), 60)
        except (TimeoutError, asyncio.CancelledError, Exception) as e:
            run["errors"]["cleanup"] = f"stopping chains: {type(e).__name__}: {e}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench; 0 when every phase ran, 1 when one failed, 124 on the watchdog."""
    args = parse_args(argv)
    # The scheduler logs every admission and eviction; thousands of them are noise here.
    logging.getLogger("scheduler").setLevel(logging.ERROR)
    budget = Budget(args.timeout)
    reaper = Reaper()
    workdir = Path(tempfile.mkdtemp(prefix="kf-bench-"))
    run: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)]),
        "quick": args.quick, "users": args.users, "timeout_s": args.timeout,
        "phases": {}, "errors": {}, "machine": describe(),
    }  # fmt: skip
    try:
        with Watchdog(budget, reaper):
            asyncio.run(run_bench(args, run, budget, workdir, reaper))
    finally:
        left = reaper.reap()
        if left:
            run["errors"]["leftovers"] = f"stopped {len(left)} leftover processes: {sorted(left)}"
        run["seconds"] = round(time.monotonic() - budget.started, 1)
        paths = write_results(run, args.results_dir)
        progress(f"results: {', '.join(str(p) for p in paths)}")
        if args.keep_workdir:
            progress(f"scratch folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if run["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
