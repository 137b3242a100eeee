"""Scheduler policy as pure functions: reconciliation plans, lease states, user-facing texts.

No Redis, no sleeps: time is passed in.
"""

from __future__ import annotations

import pytest

from kernelfleet.config import Quota, Quotas
from scheduler import messages
from scheduler.activity import lease_state
from scheduler.admission import quota_limits
from scheduler.quotas import effective_quota
from scheduler.reconcile import plan

NOW = 1_700_000_000.0


def test_a_lease_without_a_kernel_is_released_only_after_its_grace() -> None:
    leases = {"old": NOW - 500, "launching": NOW - 10, "running": NOW - 500}
    first = plan(
        leases=leases,
        kernels={"running"},
        missing={},
        orphans={},
        now=NOW,
        listed_at=NOW,
        lease_grace_s=30,
        launch_timeout_s=60,
    )
    assert first.release == [] and first.missing == {"old": NOW}  # seen missing: wait
    later = plan(
        leases=leases,
        kernels={"running"},
        missing=first.missing,
        orphans={},
        now=NOW + 29,
        listed_at=NOW + 29,
        lease_grace_s=30,
        launch_timeout_s=60,
    )
    assert later.release == [] and later.missing == {"old": NOW}
    due = plan(
        leases=leases,
        kernels={"running"},
        missing=later.missing,
        orphans={},
        now=NOW + 30,
        listed_at=NOW + 30,
        lease_grace_s=30,
        launch_timeout_s=60,
    )
    assert due.release == ["old"] and due.missing == {}


def test_a_lease_that_came_back_forgets_it_was_missing() -> None:
    leases = {"k": NOW - 500}
    back = plan(
        leases=leases,
        kernels={"k"},
        missing={"k": NOW - 20},
        orphans={},
        now=NOW,
        listed_at=NOW,
        lease_grace_s=30,
    )
    assert back.release == [] and back.missing == {}


def test_a_launching_kernel_is_never_missing() -> None:
    # EG lists a kernel once it started: a lease younger than the launch timeout waits.
    leases = {"young": NOW - 59}
    result = plan(
        leases=leases,
        kernels=set(),
        missing={"young": NOW - 1000},
        orphans={},
        now=NOW,
        listed_at=NOW,
        launch_timeout_s=60,
    )
    assert result.release == [] and result.missing == {}


def test_a_kernel_without_a_lease_is_stopped_after_its_grace() -> None:
    first = plan(
        leases={},
        kernels={"orphan"},
        missing={},
        orphans={},
        now=NOW,
        listed_at=NOW,
        kernel_grace_s=60,
    )
    assert first.shutdown == [] and first.orphans == {"orphan": NOW}
    due = plan(
        leases={},
        kernels={"orphan"},
        missing={},
        orphans=first.orphans,
        now=NOW + 60,
        listed_at=NOW + 60,
        kernel_grace_s=60,
    )
    assert due.shutdown == ["orphan"] and due.orphans == {}
    gone = plan(
        leases={}, kernels=set(), missing={}, orphans=first.orphans, now=NOW + 5, listed_at=NOW + 5
    )
    assert gone.shutdown == [] and gone.orphans == {}


@pytest.mark.parametrize(
    ("execution_state", "expected"),
    [
        ("idle", "idle"),
        ("busy", "busy"),
        ("starting", "starting"),
        ("restarting", "starting"),
        ("autorestarting", "starting"),
        ("dead", "dead"),
        ("unknown", None),
        ("", None),
    ],
)
def test_execution_states_move_leases(execution_state: str, expected: str | None) -> None:
    assert lease_state(execution_state) == expected


def test_ordinals() -> None:
    assert [messages.ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111)] == [
        "1st",
        "2nd",
        "3rd",
        "4th",
        "11th",
        "12th",
        "13th",
        "21st",
        "22nd",
        "101st",
        "111th",
    ]


def test_queue_timeout_says_why_and_where_the_user_stood() -> None:
    text = messages.queue_timeout(
        pool="gpu", gpus_total=2, gpus_free=0, need_gpus=1, position=2, alternative="python-cpu"
    )
    assert text == "All 2 GPUs are in use; you were 2nd in line. Try again, or pick python-cpu."
    partial = messages.queue_timeout(
        pool="gpu", gpus_total=4, gpus_free=1, need_gpus=2, position=1, alternative=None
    )
    assert partial == "Only 1 of 4 GPUs are free; you were 1st in line. Try again later."
    cpu = messages.queue_timeout(
        pool="cpu", gpus_total=0, gpus_free=0, need_gpus=0, position=3, alternative=None
    )
    assert cpu == "Pool cpu is full; you were 3rd in line. Try again later."


def test_quota_texts() -> None:
    assert messages.kernels_quota(used=2, limit=3, queued=1) == (
        "You already have 2 of 3 kernels running and 1 waiting for a pool. "
        "Shut one down from the Running panel, or wait."
    )
    assert messages.gpu_hours_quota(
        used_s=4 * 3600, limit_s=4 * 3600, alternative="python-cpu"
    ) == (
        "GPU-hour quota: you used 4 of 4 GPU-hours in the last 24 hours. "
        "Try again later, or pick python-cpu."
    )
    assert messages.pool_queue_busy(pool="gpu", waiting=1, alternative=None) == (
        "1 request is already waiting for pool gpu. Try again later."
    )


def test_quota_limits_for_the_scripts() -> None:
    assert quota_limits(Quota(kernels=3, cpus=2.5, gpu_hours_per_day=1.5)) == {
        "kernels": 3,
        "cpus_milli": 2500,
        "memory": -1,
        "gpus": -1,
        "gpu_seconds": 5400,
    }


QUOTAS = Quotas.model_validate(
    {
        "default": {"kernels": 2, "gpus": 0, "gpu_hours_per_day": 0},
        "groups": {
            "ml": {"gpus": 1, "gpu_hours_per_day": 4},
            "research": {"gpus": 2, "gpu_hours_per_day": 8, "kernels": 1},
            "unlimited-gpu-time": {"gpu_hours_per_day": None},
        },
        "users": {"dana": {"gpu_hours_per_day": 1}},
    }
)


def test_several_groups_most_generous_applies_per_field_user_override_wins() -> None:
    both = effective_quota(QUOTAS, "erin", ["ml", "research"])
    assert (both.gpus, both.gpu_hours_per_day) == (2, 8)
    # kernels: only research sets it, so research's 1 applies, not the default 2
    assert both.kernels == 1
    assert effective_quota(QUOTAS, "fay", ["ml"]).kernels == 2
    assert effective_quota(QUOTAS, "gus", ["ml", "unlimited-gpu-time"]).gpu_hours_per_day is None
    dana = effective_quota(QUOTAS, "dana", ["research", "unlimited-gpu-time"])
    assert (dana.gpus, dana.gpu_hours_per_day) == (2, 1)
    assert effective_quota(QUOTAS, "nobody", []).gpu_hours_per_day == 0
