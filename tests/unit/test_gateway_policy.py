"""gateway.server.policy: curated kernelspecs by group, client env sanitising, homes."""

from __future__ import annotations

import pytest

from gateway.server.errors import GatewayError
from gateway.server.identity import Identity
from gateway.server.policy import (
    check_may_start,
    home_for,
    may_use,
    sanitize_client_env,
    scheduler_kernelspec_name,
)

ALICE = Identity("alice", frozenset({"analysts"}))
CAROL = Identity("carol", frozenset({"ml"}))
OPS = Identity("ops", frozenset(), admin=True)


def spec(groups: list[str] | None, *, curated: bool = True) -> dict:
    metadata: dict = {"process_proxy": {}}
    if curated:
        metadata["kernelfleet"] = {"name": "python-gpu", "pool": "gpu"}
        if groups is not None:
            metadata["kernelfleet"]["groups"] = groups
    return {"argv": [], "metadata": metadata}


def test_groups_decide_who_may_use_a_curated_kernelspec() -> None:
    assert may_use(ALICE, spec(["*"])) and may_use(CAROL, spec(["*"]))
    assert may_use(CAROL, spec(["ml"])) and not may_use(ALICE, spec(["ml"]))
    assert may_use(OPS, spec(["ml"]))
    assert not may_use(ALICE, spec(None)) and may_use(OPS, spec(None))  # no groups: admins only


def test_non_curated_kernelspecs_are_for_nobody() -> None:
    plain = spec(["*"], curated=False)
    assert not may_use(ALICE, plain) and not may_use(OPS, plain)
    with pytest.raises(GatewayError) as info:
        check_may_start(OPS, "plain", plain)
    assert info.value.status_code == 404 and info.value.message == "Kernelspec 'plain' not found."


def test_refusal_names_the_kernelspec_and_its_groups() -> None:
    with pytest.raises(GatewayError) as info:
        check_may_start(ALICE, "python-gpu", spec(["ml", "gpu-users"]))
    assert info.value.status_code == 403
    assert info.value.message == (
        "Kernelspec 'python-gpu' is not available to you (allowed groups: ml, gpu-users)."
    )
    with pytest.raises(GatewayError) as missing:
        check_may_start(ALICE, "nope", None)
    assert missing.value.status_code == 404
    check_may_start(CAROL, "python-gpu", spec(["ml"]))


def test_client_env_loses_what_the_kernelspec_and_scheduler_own() -> None:
    kept, dropped = sanitize_client_env(
        {
            "KERNEL_USERNAME": "alice",
            "KERNEL_IMAGE": "evil",
            "KERNEL_UID": "0",
            "KERNEL_GID": "0",
            "KERNEL_NAMESPACE": "kube-system",
            "KERNEL_CPUS": "64",
            "KERNEL_MEMORY": "1Ti",
            "KERNEL_GPUS": "8",
            "KERNEL_CPUS_LIMIT": "64",
            "KERNEL_MEMORY_REQUEST": "1Ti",
            "KERNEL_VOLUMES": "[]",
            "KERNEL_VOLUME_MOUNTS": "[]",
            "KERNEL_WORKING_DIR": "/",
            "KERNEL_ID": "00000000-0000-4000-8000-000000000000",
            "KERNEL_WARM": "true",
            "KERNEL_LAUNCH_TIMEOUT": "40",
            "KERNEL_EXTRA": "fine",
        }
    )
    assert kept == {"KERNEL_LAUNCH_TIMEOUT": "40", "KERNEL_EXTRA": "fine"}
    assert "KERNEL_USERNAME" not in dropped  # replaced, not worth a log line
    assert dropped == [
        "KERNEL_CPUS",
        "KERNEL_CPUS_LIMIT",
        "KERNEL_GID",
        "KERNEL_GPUS",
        "KERNEL_ID",
        "KERNEL_IMAGE",
        "KERNEL_MEMORY",
        "KERNEL_MEMORY_REQUEST",
        "KERNEL_NAMESPACE",
        "KERNEL_UID",
        "KERNEL_VOLUMES",
        "KERNEL_VOLUME_MOUNTS",
        "KERNEL_WARM",
        "KERNEL_WORKING_DIR",
    ]


def test_scheduler_name_comes_from_metadata() -> None:
    assert scheduler_kernelspec_name("dir-name", spec(["*"])) == "python-gpu"
    assert scheduler_kernelspec_name("dir-name", {"metadata": {"kernelfleet": {}}}) == "dir-name"


def test_home_is_one_folder_per_user_under_the_root(tmp_path) -> None:
    assert home_for(str(tmp_path), "alice") == str(tmp_path / "alice")
    for bad in ("", ".", "..", "a/b", "../etc"):
        with pytest.raises(GatewayError):
            home_for(str(tmp_path), bad)
