"""The eviction rules as a pure function of one lease, its kernelspec and the clock."""

from __future__ import annotations

from kernelfleet.kernelspecs.spec import KernelSpec
from scheduler.eviction_messages import minutes, stopped, warning
from scheduler.eviction_policy import Warning_, decide, pressure_victim
from scheduler.leases import Lease

GPU = KernelSpec(name="python-gpu", display_name="GPU", pool="gpu", idle_timeout=1800,
                 max_lifetime=3600, warning_before=300, evict_connected_idle=True)  # fmt: skip


def lease(kernel_id: str = "k", *, state: str = "idle", last: float = 0.0, conns: int = 0) -> Lease:
    return Lease(kernel_id=kernel_id, user="u", kernelspec="python-gpu", pool="gpu", cpus=1,
                 memory=1, gpus=1, gpu_devices=[0], state=state, created=0.0,  # type: ignore[arg-type]
                 last_activity=last, connections=conns)  # fmt: skip


def test_starting_and_busy_kernels_are_kept_until_their_lifetime() -> None:
    for state in ("starting", "busy"):
        assert decide(lease(state=state), GPU, now=3000, warned=None).action == "keep"
        late = decide(lease(state=state), GPU, now=3300, warned=None)
        assert (late.action, late.reason) == ("warn", "max_lifetime")
        assert decide(lease(state=state), GPU, now=3600, warned=None).action == "evict"


def test_a_late_warning_still_gives_the_full_warning_time() -> None:
    verdict = decide(lease(conns=1), GPU, now=2000, warned=None)  # sweep ran late
    assert (verdict.action, verdict.deadline) == ("warn", 2300)
    warned = Warning_(activity=0.0, reason="idle", deadline=2300)
    assert decide(lease(), GPU, now=2299, warned=warned).action == "keep"
    assert decide(lease(), GPU, now=2300, warned=warned).action == "evict"
    # activity since the warning: a fresh stretch, not an eviction
    assert decide(lease(last=2100), GPU, now=2300, warned=warned).action == "keep"


def test_pressure_picks_the_longest_idle_past_the_grace() -> None:
    leases = [lease("a", last=500), lease("b", last=100), lease("c", state="busy", last=0)]
    assert pressure_victim(leases, now=1200, grace_s=600) == leases[1]  # a qualifies too
    assert pressure_victim(leases, now=700, grace_s=600) == leases[1]  # exactly the grace
    assert pressure_victim(leases, now=699, grace_s=600) is None  # busy c never counts


def test_messages() -> None:
    assert minutes(30) == "less than a minute" and minutes(61) == "1 minute"
    text = warning(reason="idle", kernelspec="python-gpu", gpus=1, idle_s=1500, in_s=300)
    assert text == ("kernelfleet: this GPU kernel has been idle for 25 minutes and will be shut "
                    "down in 5 minutes to free the GPU. Run any cell to keep it.")  # fmt: skip
    note = stopped(reason="idle", kernelspec="python-gpu", at=0.0, idle_s=1800)
    assert note.startswith("Your python-gpu kernel was stopped at ")
    assert note.endswith(" after 30 min idle.")
