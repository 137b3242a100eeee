"""The bench cannot rot: its report renders, and a quick admission phase runs on real Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench.admission import Ledger, _process_cpu_s, in_process, measure
from bench.report import markdown, targets, write_results
from bench.runtime import Reaper
from bench.scheduling import bench_platform, scheduler_on
from bench.users import hub_log_lines
from scheduler.leases import Lease


def _run() -> dict:
    round_trip = {"raw": 6.0, "jupyter-server": 48.0, "stock-eg": 50.0, "kernelfleet": 7.5}
    chains = {key: {"round_trip": {"n": 10, "p50_ms": ms, "p95_ms": ms * 2, "p99_ms": ms * 3,
                                   "per_s": round(1000 / ms, 1)},
                    "cold_start": {"n": 3, "p50_ms": 450.0, "p95_ms": 500.0}}
              for key, ms in round_trip.items()}  # fmt: skip
    chains["kernelfleet"]["warm_start"] = {"n": 3, "p50_ms": 40.0, "p95_ms": 170.0}
    return {
        "started": "2026-11-22T22:00:00+0000", "command": "python -m bench --quick", "quick": True,
        "seconds": 12.0, "errors": {},
        "machine": {"cpu": "Test CPU", "cores": 2, "memory_gib": 8.0, "versions": {}},
        "phases": {"latency": {"plan": {"starts": 3}, "chains": chains,
                               "round_trip_machine": {"machine_busy_pct": 60.0,
                                                      "steal_pct": 7.5}},
                   "admission": {"inprocess": {"50": {"p50_ms": 2.0, "p99_ms": 4.0, "per_s": 900,
                                                      "outcomes": {"admitted": 10},
                                                      "over_commits": 0, "redis_cpu_us": 80.5,
                                                      "process_cpu_us": 120.0,
                                                      "machine_busy_pct": 97.0,
                                                      "steal_pct": 1.5}}}},
    }  # fmt: skip


def test_report_renders_tables_ratios_and_targets(tmp_path: Path) -> None:
    run = _run()
    run["targets"] = targets(run)
    met = {row["target"]: row["met"] for row in run["targets"]}
    assert met["round trip p50 / raw ZMQ"] is True  # 7.5 / 6.0 = 1.25
    assert met["stock EG round trip p50 / kernelfleet"] is True  # 50 / 7.5 = 6.7
    assert met["users succeeding (kernelfleet)"] is None  # not run
    assert met["warm start p50, ms (issue #4)"] is True  # 40 <= 60
    assert met["warm start p95, ms (issue #4)"] is False  # 170 > 150
    text = markdown(run)
    row = "| round trip `1+1` | 6.0 / 12.0 | 48.0 / 96.0 | 50.0 / 100.0 | 7.5 / 15.0 | 1.25x |"
    assert row in text
    assert "Test CPU, 2 cores" in text
    assert "| kernel start, warm (baselines: none) | - | - | - | 40.0 / 170.0 | |" in text
    assert "| admitted 10 | 0 | 80.5 / 120.0 / - | 97.0% (1.5%) |" in text
    # how much CPU the hypervisor took while a target's figure was measured
    assert "| round trip p50 / raw ZMQ | 1.25 | <= 1.3 | yes | 7.5% |" in text
    assert "| 4.0 | <= 5.0 | yes | 1.5% |" in text
    assert "| warm start p50, ms (issue #4) | 40.0 | <= 60.0 | yes |  |" in text
    assert "60.0% busy, 7.5% of its CPU time stolen by the hypervisor" in text
    paths = write_results(_run(), tmp_path)
    assert [p.name for p in paths][1] == "latest.md" and paths[0].suffix == ".json"


async def test_quick_admission_phase_on_real_redis(redis_url: str) -> None:
    platform = bench_platform(users=20, cpus=4, gpus=1)
    began = time.monotonic()
    async with scheduler_on(redis_url, platform) as scheduler:
        decide, release = in_process(scheduler)
        for concurrency, decisions, warmup in ((1, 30, 0), (5, 150, 40)):
            found = await measure(scheduler, platform, decide, release, concurrency=concurrency,
                                  decisions=decisions, warmup=warmup)  # fmt: skip
            # only the decisions after the warm-up are measured; the warm-up's opening
            # burst (every worker's first request at once) is reported apart
            assert found["n"] == decisions == sum(found["outcomes"].values())
            assert ("opening_max_ms" in found) == (warmup > 0), found
            assert found["over_commits"] == 0, found["problems"]
            # where the CPU went: Redis ran the scripts, this process the scheduler
            assert found["redis_cpu_us"] > 0 and found["process_cpu_us"] > 0, found
        # 5 workers for 4 CPUs: the pool refused some, and nothing was left leased
        assert "pool_full" in found["outcomes"] or "quota_exceeded" in found["outcomes"]
        assert await scheduler.leases.list() == []
    assert time.monotonic() - began < 15


def test_a_processs_cpu_is_read_from_proc() -> None:
    """The scheduler process's CPU (over HTTP) is read from /proc: checked on this process."""
    before_own, before = time.process_time(), _process_cpu_s(os.getpid())
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    after, after_own = _process_cpu_s(os.getpid()), time.process_time()
    assert before is not None and after is not None
    assert abs((after - before) - (after_own - before_own)) < 0.1
    assert _process_cpu_s(None) is None


async def test_the_ledger_sees_an_over_commit(redis_url: str) -> None:
    """The client-side check is not vacuous: two 1-GPU leases in a 1-GPU pool are caught."""
    platform = bench_platform(users=4, cpus=4, gpus=1)
    async with scheduler_on(redis_url, platform) as scheduler:
        ledger = Ledger(scheduler, platform)
        for user in ("s0001", "s0003"):
            ledger.admitted(Lease(kernel_id=user, user=user, kernelspec="python-gpu", pool="gpu",
                                  cpus=1, memory=1, gpus=1, gpu_devices=[0], state="starting",
                                  created=0, last_activity=0))  # fmt: skip
    assert ledger.check() == ["pool gpu GPUs over capacity"]


def test_a_failed_users_hub_log_lines_are_kept(tmp_path: Path) -> None:
    """The hub's progress stream may say only "Spawn failed": its log says why."""
    log = tmp_path / "hub.log"
    log.write_text(
        "[I 2026-11-23 09:41:00.001 JupyterHub log:192] 200 GET /hub/spawn/s0012\n"
        "[W 2026-11-23 09:41:00.002 JupyterHub _xsrf_utils:215] Skipping XSRF check for "
        "insecure request GET /hub/api/users/s0012\n"
        "[E 2026-11-23 09:41:02.002 JupyterHub base:1217] Failed to add s0012 to proxy!\n"
        "[W 2026-11-23 09:41:02.003 JupyterHub base:1220] Stopping s0012 to avoid it\n"
        "[E 2026-11-23 09:41:03.004 JupyterHub base:1217] Failed to add s00123 to proxy!\n"
        + "".join(f"[W 2026-11-23 09:42:0{i}.000 JupyterHub x:1] clean-up {i} of s0012\n"
                  for i in range(5))
    )  # fmt: skip
    found = hub_log_lines(log, ["s0012", "s0040"])
    # the cause first (not the clean-up after it), without the xsrf noise
    assert [line.split("] ")[1] for line in found["s0012"]] == [
        "Failed to add s0012 to proxy!", "Stopping s0012 to avoid it", "clean-up 0 of s0012",
        "clean-up 1 of s0012"]  # fmt: skip
    assert found["s0040"] == []
    assert "unreadable" in hub_log_lines(tmp_path / "missing.log", ["s0012"])["s0012"][0]


def test_the_reaper_can_pause_its_scans_and_still_finds_children() -> None:
    """Its scans take this process's GIL: timed phases pause them; nothing is missed.
    (Rooted at a process of its own: a reaper of pytest's children would stop the test
    session's shared Redis.)"""
    script = ("import subprocess, time; time.sleep(0.3); "
              "subprocess.Popen(['/bin/sleep', '30']); time.sleep(30)")  # fmt: skip
    parent = subprocess.Popen([sys.executable, "-c", script])
    reaper = Reaper(scan_interval_s=0.01, root=parent.pid)
    try:
        scans = 0
        original = reaper.scan

        def counting() -> None:
            nonlocal scans
            scans += 1
            original()

        reaper.scan = counting  # type: ignore[method-assign]
        with reaper.paused():
            time.sleep(0.8)  # the parent starts its child meanwhile
            assert scans == 0
        # the catch-up scan on leaving found the child (the thread may already scan again)
        assert scans >= 1
        assert "sleep" in [proc.name() for proc in reaper.alive()]
        after_pause = scans
        time.sleep(0.2)
        assert scans > after_pause  # background scans resumed
    finally:
        left = reaper.reap(grace_s=2)  # its root's descendants, not the root
        parent.kill()
        parent.wait(timeout=5)
    assert left == ["sleep"]
