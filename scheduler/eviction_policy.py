"""When a kernel is warned and when it is evicted: a pure function of one lease and the clock.

Idle means the gateway saw no IOPub message (no execution, no output) since the lease's
``last_activity``. The rules, in order:

1. past the kernelspec's ``max_lifetime`` the kernel is stopped, busy or not (warned
   ``warning_before`` ahead);
2. a kernel that is not ``idle`` (busy, starting) is kept;
3. a connected kernel is kept unless the kernelspec says ``evict_connected_idle`` (GPU
   kernelspecs do: an open but silent browser tab must not hold a GPU);
4. ``warning_before`` ahead of ``last_activity + idle_timeout`` every connected client is
   warned; the eviction happens at that time, but never sooner than ``warning_before``
   after the warning was sent (a sweep that was late still gives the full warning);
5. under pressure (someone waits for the kernel's full pool), the longest-idle kernel of the
   pool idle for at least ``pressure_grace_s`` is warned with ``pressure_warning_s`` and
   then evicted.

Any activity after a warning (a cell run) changes ``last_activity``, so the warning no
longer matches the lease and the eviction is off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kernelfleet.kernelspecs.spec import KernelSpec

from .leases import Lease

Action = Literal["keep", "warn", "evict"]
Reason = Literal["idle", "max_lifetime", "pressure"]
#: Seconds a kernel must have been idle before pressure may evict it.
PRESSURE_GRACE_S = 600.0
#: Seconds of warning before a pressure eviction (the idle warning, shortened).
PRESSURE_WARNING_S = 60.0


@dataclass(frozen=True)
class Warning_:
    """A warning that was sent: for which activity, why, and when the eviction is due."""

    activity: float
    reason: Reason
    deadline: float


@dataclass(frozen=True)
class Verdict:
    """What to do with one kernel now."""

    action: Action
    reason: Reason | None = None
    idle_s: float = 0.0
    deadline: float | None = None


KEEP = Verdict("keep")


def _warned_or_evict(
    warned: Warning_ | None, *, reason: Reason, activity: float, due: float, warning_s: float,
    now: float, idle_s: float,
) -> Verdict:  # fmt: skip
    """Warn once for this (reason, activity); evict when the warned deadline passed."""
    if warned is None or warned.activity != activity or warned.reason != reason:
        return Verdict("warn", reason, idle_s, max(due, now + warning_s))
    if now >= warned.deadline:
        return Verdict("evict", reason, idle_s, warned.deadline)
    return Verdict("keep", reason, idle_s, warned.deadline)


def decide(lease: Lease, spec: KernelSpec, *, now: float, warned: Warning_ | None) -> Verdict:
    """Keep, warn or evict ``lease`` under its kernelspec's idle policy (rules 1-4)."""
    idle_s = max(0.0, now - lease.last_activity) if lease.state == "idle" else 0.0
    end_of_life = lease.created + spec.max_lifetime
    if now >= end_of_life:  # no further warning: the lifetime is a hard limit
        return Verdict("evict", "max_lifetime", idle_s, end_of_life)
    if now >= end_of_life - spec.warning_before:
        return _warned_or_evict(warned, reason="max_lifetime", activity=lease.created,
                                due=end_of_life, warning_s=0.0, now=now, idle_s=idle_s)  # fmt: skip
    if lease.state != "idle" or (lease.connections and not spec.evict_connected_idle):
        return KEEP
    due = lease.last_activity + spec.idle_timeout
    if now < due - spec.warning_before:
        return KEEP
    return _warned_or_evict(warned, reason="idle", activity=lease.last_activity, due=due,
                            warning_s=spec.warning_before, now=now, idle_s=idle_s)  # fmt: skip


def pressure_victim(
    leases: list[Lease], *, now: float, grace_s: float = PRESSURE_GRACE_S
) -> Lease | None:
    """The longest-idle lease idle for at least ``grace_s`` (rule 5), or None."""
    idle = [lease for lease in leases if lease.state == "idle"]
    idle = [lease for lease in idle if now - lease.last_activity >= grace_s]
    return min(idle, key=lambda lease: (lease.last_activity, lease.kernel_id), default=None)


def decide_pressure(
    lease: Lease, *, now: float, warned: Warning_ | None, warning_s: float = PRESSURE_WARNING_S
) -> Verdict:
    """Warn, then evict, the pool's pressure victim (the shortened warning)."""
    return _warned_or_evict(warned, reason="pressure", activity=lease.last_activity,
                            due=now, warning_s=warning_s, now=now,
                            idle_s=max(0.0, now - lease.last_activity))  # fmt: skip
