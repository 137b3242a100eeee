"""Time bounds and process hygiene for one bench run.

Every run is bounded: a :class:`Budget` holds the run's deadline and hands each phase a slice
of what is left (keeping a reserve for stopping everything). Every process the bench starts
is registered with the :class:`Reaper`, which also remembers their descendants (kernels that
servers launched, servers that the hub spawned) while they live, so that at the end - or
when the :class:`Watchdog` fires because something hung past the deadline - nothing started
by this run survives it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psutil  # type: ignore[import-untyped]

#: Seconds kept back from every phase for stopping servers and writing the report.
CLEANUP_RESERVE_S = 45.0
#: Seconds the watchdog waits past the deadline before it kills everything and exits.
WATCHDOG_GRACE_S = 60.0


class Budget:
    """The run's deadline (monotonic seconds) and each phase's share of it."""

    def __init__(self, total_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.total_s = total_s
        self._clock = clock
        self.started = clock()
        self.deadline = self.started + total_s

    def remaining(self) -> float:
        """Seconds left before the run's deadline (never negative)."""
        return max(0.0, self.deadline - self._clock())

    def phase_limit(self, wanted_s: float) -> float:
        """How long a phase that would like ``wanted_s`` may run, keeping the cleanup reserve."""
        return max(0.0, min(wanted_s, self.remaining() - CLEANUP_RESERVE_S))


def progress(message: str) -> None:
    """One line of progress on stderr (stdout is kept for the final table)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Reaper:
    """Remembers every descendant of this process while it lives, and ends them all.

    Everything the bench starts (servers, the hub, kernels, Redis) descends from the bench
    process. A background thread re-reads the descendants every ``scan_interval_s``, so a
    kernel whose server died (re-parented to init) is still known. Processes are identified
    by (pid, start time): a recycled pid is never signalled. A scan holds this process's GIL
    for ~1.5 ms (psutil walking /proc): phases that time code in this process pause the scans
    meanwhile (:meth:`paused`).
    """

    def __init__(self, *, scan_interval_s: float = 1.0, root: int | None = None) -> None:
        self._me = psutil.Process(root)  # root: whose descendants (default: this process)
        self._known: dict[tuple[int, float], str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._thread = threading.Thread(target=self._scan_loop, args=(scan_interval_s,),
                                        name="bench-reaper", daemon=True)  # fmt: skip
        self._thread.start()

    def scan(self) -> None:
        """Record the current descendants of this process."""
        try:
            family = self._me.children(recursive=True)
        except psutil.Error:
            return
        for proc in family:
            try:
                key, name = (proc.pid, proc.create_time()), proc.name()
            except psutil.Error:
                continue
            with self._lock:
                self._known.setdefault(key, name)

    def _scan_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            if not self._paused.is_set():
                self.scan()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No background scans inside (for timings taken in this process); one scan right
        after, and :meth:`reap` scans again anyway. Only for code that starts no process
        whose children could outlive it unseen."""
        self._paused.set()
        try:
            yield
        finally:
            self._paused.clear()
            self.scan()

    def alive(self) -> list[psutil.Process]:
        """Known processes still running (same pid *and* start time)."""
        with self._lock:
            known = list(self._known)
        found = []
        for pid, created in known:
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except psutil.Error:
                continue
        return found

    def reap(self, *, grace_s: float = 5.0) -> list[str]:
        """SIGTERM what is left, SIGKILL what survives ``grace_s``; names of what was left."""
        self.scan()
        self._stop.set()
        left = self.alive()
        names = []
        for proc in left:
            try:
                names.append(proc.name())
            except psutil.Error:
                continue
            _quietly(proc.terminate)
        _, survivors = psutil.wait_procs(left, timeout=grace_s)
        for proc in survivors:
            _quietly(proc.kill)
        psutil.wait_procs(survivors, timeout=grace_s)
        return names


def _quietly(action: Callable[[], object]) -> None:
    try:
        action()
    except psutil.Error:
        pass


class Watchdog:
    """Kills everything and exits with status 124 if the run outlives its deadline by far.

    The normal path never gets here: phases are cancelled at their deadlines and the run
    stops its servers itself. This is for a hang that cancellation cannot reach (a thread
    stuck in a blocking call).
    """

    def __init__(self, budget: Budget, reaper: Reaper, *, grace_s: float = WATCHDOG_GRACE_S):
        self._budget, self._reaper, self._grace_s = budget, reaper, grace_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bench-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()

    def _watch(self) -> None:
        if self._done.wait(self._budget.remaining() + self._grace_s):
            return
        progress(f"watchdog: the run outlived its {self._budget.total_s:.0f} s limit; killing")
        self._reaper.reap(grace_s=2.0)
        os._exit(124)
