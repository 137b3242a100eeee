"""Results: ``bench/results/<timestamp>.json`` and ``bench/results/latest.md``.

The JSON holds everything measured (summaries, outcomes, the machine, versions, errors);
the markdown is the table the README quotes: each figure per chain, ratios to the
baselines, and the issue's targets with whether this run met them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .machine import describe
from .stats import ratio

CHAINS = ("raw", "jupyter-server", "stock-eg", "kernelfleet")
CHAIN_HEADS = ("raw ZMQ", "jupyter-server", "stock EG chain", "kernelfleet")
LATENCY_ROWS = (
    ("kernel start, cold", "cold_start"),
    ("round trip `1+1`", "round_trip"),
    ("1 MiB output, in full", "output_1mb"),
    ("10,000-line print stream, in full", "stream_10k"),
)


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _ms(summary: Any, *keys: str) -> str:
    if not isinstance(summary, dict) or summary.get("n", 0) == 0:
        return "-"
    return " / ".join(f"{summary[k]:.1f}" for k in keys if k in summary)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def latency_section(latency: dict[str, Any]) -> list[str]:
    """Each latency figure per chain (p50 / p95 ms), kernelfleet's ratios to the baselines."""
    chains = latency.get("chains", {})
    lines = ["## Interactive latency (ms: p50 / p95; ratios of p50)", "",
             "| figure | " + " | ".join(CHAIN_HEADS) + " | kernelfleet / raw | "
             "stock EG / kernelfleet |", "|---" * 7 + "|"]  # fmt: skip
    for label, figure in LATENCY_ROWS:
        cells = [_ms(_get(chains, key, figure), "p50_ms", "p95_ms") for key in CHAINS]
        kf, raw, stock = (_get(chains, key, figure, "p50_ms")
                          for key in ("kernelfleet", "raw", "stock-eg"))  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(cells)
                     + f" | {_x(ratio(kf, raw))} | {_x(ratio(stock, kf))} |")  # fmt: skip
    warm = _get(chains, "kernelfleet", "warm_start")
    warm_cell = _ms(warm, "p50_ms", "p95_ms") if isinstance(warm, dict) else "n/a"
    # the baselines have no warm pools: kernelfleet's warm start against their cold ones
    kf_warm = _get(warm, "p50_ms")
    stock_cold = _get(chains, "stock-eg", "cold_start", "p50_ms")
    lines.append(f"| kernel start, warm (baselines: none) | - | - | - | {warm_cell} | | "
                 f"{_x(ratio(stock_cold, kf_warm))} (stock EG cold) |")  # fmt: skip
    p99 = [_ms(_get(chains, key, "round_trip"), "p99_ms") for key in CHAINS]
    per_s = [str(_get(chains, key, "round_trip", "per_s") or "-") for key in CHAINS]
    lines.append("| round trip p99 | " + " | ".join(p99) + " | | |")
    lines.append("| round trips per second | " + " | ".join(per_s) + " | | |")
    plan = latency.get("plan", {})
    lines += ["", f"Samples per chain: {plan.get('starts')} cold starts (and as many warm "
              f"starts on kernelfleet), {plan.get('round_trips')} "
              f"round trips, {plan.get('outputs')} of each output; chains interleaved in "
              f"{plan.get('rounds')} rounds."]  # fmt: skip
    machine = latency.get("round_trip_machine") or {}
    if machine:
        lines[-1] += (f" During the round trips the machine was {machine['machine_busy_pct']}% "
                      f"busy, {machine['steal_pct']}% of its CPU time stolen by the "
                      "hypervisor.")  # fmt: skip
    return lines


def admission_section(admission: dict[str, Any]) -> list[str]:
    """Latency, rate, outcomes and over-commits at each concurrency, per way in."""
    lines = ["## Scheduler admission (real Redis)", "",
             "| way in | concurrent | p50 ms | p99 ms | decisions/s | outcomes | over-commits "
             "| CPU us per decision: Redis / scheduler / clients | machine busy (steal) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for way, label in (("inprocess", "in-process Scheduler.admit"), ("http", "HTTP API")):
        for level, found in (admission.get(way) or {}).items():
            outcomes = ", ".join(f"{k} {v}" for k, v in sorted(found.get("outcomes", {}).items()))
            lines.append(f"| {label} | {level} | {found.get('p50_ms', '-')} | "
                         f"{found.get('p99_ms', '-')} | {found.get('per_s', '-')} | {outcomes} | "
                         f"{found.get('over_commits', '-')} | {_cpu_cell(way, found)} | "
                         f"{_busy_cell(found)} |")  # fmt: skip
    lines += ["", "CPU per decision counts its release too. In-process, the scheduler and the "
              "clients are one process (shown under scheduler)."]  # fmt: skip
    return lines


def _cpu_cell(way: str, found: dict[str, Any]) -> str:
    """Redis / scheduler / clients CPU per decision, '-' where not measured."""
    redis = found.get("redis_cpu_us", "-")
    if way == "inprocess":
        return f"{redis} / {found.get('process_cpu_us', '-')} / -"
    return f"{redis} / {found.get('server_cpu_us', '-')} / {found.get('process_cpu_us', '-')}"


def _busy_cell(found: dict[str, Any]) -> str:
    busy = found.get("machine_busy_pct")
    return "-" if busy is None else f"{busy}% ({found.get('steal_pct', '-')}%)"


def scale_section(scale: dict[str, Any]) -> list[str]:
    """Sweep times and Redis memory per lease."""
    sweeps = scale.get("sweeps")
    rows = [f"{s['sweep']}: {s['seconds']} s ({s['warned']} warned, {s['evicted']} evicted)"
            for s in sweeps] if isinstance(sweeps, list) else [str(sweeps or "-")]  # fmt: skip
    return ["## Scale", "",
            "| leases / users | admit only, 50 concurrent | full lease scan | eviction sweeps "
            "| Redis bytes per lease |", "|---|---|---|---|---|",
            f"| {scale.get('leases')} / {scale.get('users')} | "
            f"{_get(scale, 'admit_only', 'per_s')}/s | {_get(scale, 'full_scan', 'seconds')} s | "
            f"{'; '.join(rows)} | {scale.get('redis_bytes_per_lease')} |"]  # fmt: skip


def users_section(users: dict[str, Any]) -> list[str]:
    """Success and step times of the simulated users on each hub (seconds)."""
    lines = ["## Simulated users at once (seconds: p50 / p95)", "",
             "| hub | users | succeeded | login -> first result | login | spawn | kernel start "
             "| failures |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for hub in ("kernelfleet", "stock"):
        found = users.get(hub)
        if not found:
            continue
        cells = [_s(found.get(k)) for k in ("login_to_first_result", "login", "spawn",
                                             "kernel_start")]  # fmt: skip
        lines.append(f"| {hub} | {found['users']} | {found['succeeded']} "
                     f"({found['success_rate']:.0%}) | " + " | ".join(cells)
                     + f" | {found.get('failures') or '-'} |")  # fmt: skip
    lines += ["", f"Stock hub: {users.get('stock_is', '-')}."]
    return lines


def _s(summary: Any) -> str:
    if not isinstance(summary, dict) or not summary.get("n"):
        return "-"
    return f"{summary['p50_ms'] / 1000:.1f} / {summary['p95_ms'] / 1000:.1f}"


def targets(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with this run's value and whether it was met (None: not run)."""
    chains = _get(run, "phases", "latency", "chains") or {}
    rt = {key: _get(chains, key, "round_trip", "p50_ms") for key in CHAINS}
    cold = {key: _get(chains, key, "cold_start", "p50_ms") for key in CHAINS}
    warm = _get(chains, "kernelfleet", "warm_start") or {}
    admission = _get(run, "phases", "admission", "inprocess") or {}
    users = _get(run, "phases", "users", "kernelfleet") or {}
    over = [found.get("over_commits") for way in ("inprocess", "http")
            for found in (_get(run, "phases", "admission", way) or {}).values()]  # fmt: skip
    # CPU time the hypervisor gave other guests while the figure was measured
    rt_steal = _get(run, "phases", "latency", "round_trip_machine", "steal_pct")
    steal = {"round trip p50 / raw ZMQ": rt_steal, "stock EG round trip p50 / kernelfleet":
             rt_steal, "admission p99 at 50 concurrent (in-process), ms":
             _get(admission, "50", "steal_pct")}  # fmt: skip
    rows = [
        ("round trip p50 / raw ZMQ", ratio(rt["kernelfleet"], rt["raw"]), "<=", 1.3),
        ("stock EG round trip p50 / kernelfleet", ratio(rt["stock-eg"], rt["kernelfleet"]),
         ">=", 4.0),
        ("cold start p50 / stock EG", ratio(cold["kernelfleet"], cold["stock-eg"]), "<=", 1.15),
        ("warm start p50, ms (issue #4)", _get(warm, "p50_ms"), "<=", 60.0),
        ("warm start p95, ms (issue #4)", _get(warm, "p95_ms"), "<=", 150.0),
        ("admission p99 at 50 concurrent (in-process), ms",
         _get(admission, "50", "p99_ms"), "<=", 5.0),
        ("users succeeding (kernelfleet)", users.get("success_rate"), ">=", 0.99),
        ("over-commits", sum(over) if over and None not in over else None, "<=", 0),
    ]  # fmt: skip
    return [{"target": name, "value": value, "limit": f"{op} {limit}",
             "met": None if value is None else (value <= limit if op == "<=" else value >= limit),
             "steal_pct": steal.get(name)}
            for name, value, op, limit in rows]  # fmt: skip


def machine_lines(machine: dict[str, Any]) -> list[str]:
    """The machine and versions, as a few lines of text."""
    versions = machine.get("versions", {})
    text = "; ".join(f"{env}: " + ", ".join(f"{k} {v}" for k, v in found.items())
                     for env, found in versions.items() if found)  # fmt: skip
    return [f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores, "
            f"{machine.get('memory_gib')} GiB RAM, {machine.get('os')}, Python "
            f"{machine.get('python')}; load average at start {machine.get('load_at_start')}, "
            f"at end {machine.get('load_at_end')}.", "", f"Versions: {text}."]  # fmt: skip


def markdown(run: dict[str, Any]) -> str:
    """The whole latest.md."""
    phases = run.get("phases", {})
    lines = [f"# kernelfleet bench, {run.get('started')} ({'quick' if run.get('quick') else 'full'}"
             f" run, {run.get('seconds')} s)", "", f"Command: `{run.get('command')}`", "",
             *machine_lines(run.get("machine", {})), ""]  # fmt: skip
    lines += [
        "## Targets (issue #6)",
        "",
        "| target | this run | limit | met | CPU stolen while measured |",
        "|---|---|---|---|---|",
    ]
    for row in run.get("targets", []):
        met = {True: "yes", False: "**no**", None: "not run"}[row["met"]]
        stolen = "" if row.get("steal_pct") is None else f"{row['steal_pct']}%"
        lines.append(f"| {row['target']} | {row['value']} | {row['limit']} | {met} | {stolen} |")
    sections = (("latency", latency_section), ("admission", admission_section),
                ("scale", scale_section), ("users", users_section))  # fmt: skip
    for name, section in sections:
        if phases.get(name):
            lines += ["", *section(phases[name])]
    if run.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {k}: {v}" for k, v in run["errors"].items()]
    return "\n".join(lines) + "\n"


def write_results(run: dict[str, Any], results_dir: Path) -> list[Path]:
    """Complete ``run`` (machine, targets) and write the JSON and latest.md."""
    run.setdefault("machine", describe())
    run["machine"]["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    run["targets"] = targets(run)
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = results_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(run, indent=1, sort_keys=False) + "\n")
    md_path = results_dir / "latest.md"
    md_path.write_text(markdown(run))
    return [json_path, md_path]
