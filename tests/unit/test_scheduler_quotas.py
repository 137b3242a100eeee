"""The effective quota rule: user override, else most generous group, else default."""

from __future__ import annotations

from kernelfleet.config import Quota, Quotas
from scheduler.quotas import effective_quota

QUOTAS = Quotas.model_validate(
    {
        "default": {"kernels": 3, "gpus": 0},
        "groups": {
            "ml": {"gpus": 1, "gpu_hours_per_day": 4},
            "research": {"gpus": 2, "kernels": 2},
            "power": {"kernels": None, "memory": "64Gi"},
        },
        "users": {"alice": {"kernels": 1}, "root": {"kernels": None, "gpus": 8}},
    }
)


def test_default_applies_without_group_or_user_entries() -> None:
    assert effective_quota(QUOTAS, "bob", ["analysts"]) == Quota(kernels=3, gpus=0)


def test_group_raises_only_the_fields_it_sets() -> None:
    quota = effective_quota(QUOTAS, "carol", ["ml"])
    assert (quota.kernels, quota.gpus, quota.gpu_hours_per_day) == (3, 1, 4)


def test_most_generous_group_wins_per_field() -> None:
    quota = effective_quota(QUOTAS, "dave", ["ml", "research"])
    # gpus: max(1, 2); kernels: only research sets it, so 2 even though below the default
    assert (quota.gpus, quota.kernels, quota.gpu_hours_per_day) == (2, 2, 4)


def test_unlimited_group_value_beats_numbers() -> None:
    quota = effective_quota(QUOTAS, "erin", ["research", "power"])
    assert quota.kernels is None and quota.memory == 64 * 2**30


def test_user_override_wins_for_the_fields_it_sets() -> None:
    quota = effective_quota(QUOTAS, "alice", ["research"])
    assert (quota.kernels, quota.gpus) == (1, 2)
    assert effective_quota(QUOTAS, "root", []).kernels is None
    assert effective_quota(QUOTAS, "root", []).gpus == 8


def test_unknown_groups_are_ignored_and_builtin_default_is_three_kernels() -> None:
    assert effective_quota(Quotas(), "zed", ["nobody"]) == Quota(kernels=3)
