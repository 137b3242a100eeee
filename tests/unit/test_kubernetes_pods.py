"""Which kernel pods fail their start, and what their users read (no cluster needed)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pytest

from kernelfleet.kubernetes_settings import KubernetesSettings
from scheduler.admission import Admission, Queued
from scheduler.kubernetes import WithPlacementEnv, placement_env
from scheduler.kubernetes_pods import FailStart, StartFailure, classify
from scheduler.leases import Lease

CREATED = datetime(2026, 11, 22, 12, 0, 0, tzinfo=timezone.utc).timestamp()
SETTINGS = KubernetesSettings(pending_limit_s=30, start_limit_s=300)


def pod(*, phase: str = "Pending", waiting: str = "", node: str = "", message: str = "") -> dict:
    status: dict[str, Any] = {"phase": phase}
    if waiting:
        state = {"waiting": {"reason": waiting, "message": message}}
        status["containerStatuses"] = [{"name": "kernel", "image": "kf/k:1", "state": state}]
    if not node:
        status["conditions"] = [{"type": "PodScheduled", "status": "False",
                                 "reason": "Unschedulable", "message": message}]  # fmt: skip
    return {
        "metadata": {"name": "kernel-k1", "namespace": "ns", "creationTimestamp":
                     "2026-11-22T12:00:00Z", "labels": {"kernel_id": "k1",
                     "kernelfleet.io/kernelspec": "python-gpu", "kernelfleet.io/pool": "gpu"}},
        "spec": {"nodeName": node, "containers": [{"name": "kernel", "image": "kf/k:1"}]},
        "status": status,
    }  # fmt: skip


@pytest.mark.parametrize("reason", ["ErrImagePull", "ImagePullBackOff", "InvalidImageName"])
def test_image_pull_failures_fail_at_once(reason: str) -> None:
    failure = classify(pod(waiting=reason, node="n1", message="manifest unknown"),
                       now=CREATED + 1, settings=SETTINGS)  # fmt: skip
    assert failure is not None and failure.reason == "image_pull_failed"
    assert failure.message == (
        f"Kernel python-gpu could not start: its image kf/k:1 cannot be pulled ({reason}: "
        "manifest unknown). Ask an admin to fix the kernelspec's image or the registry."
    )


def test_missing_secret_fails_at_once() -> None:
    failure = classify(
        pod(waiting="CreateContainerConfigError", node="n1", message='secret "x" not found'),
        now=CREATED,
        settings=SETTINGS,
    )
    assert failure is not None and failure.reason == "container_config"


def test_unscheduled_pod_fails_only_past_the_limit_quoting_kubernetes() -> None:
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    assert classify(pod(message=message), now=CREATED + 29, settings=SETTINGS) is None
    failure = classify(pod(message=message), now=CREATED + 31, settings=SETTINGS)
    assert failure == StartFailure(
        kernel_id="k1", pod="kernel-k1", namespace="ns", kernelspec="python-gpu",
        reason="pending_timeout",
        message="Kernel python-gpu could not start: no node of pool gpu had room for it within "
        "30 s (0/3 nodes are available: 3 Insufficient nvidia.com/gpu.). Try again in a few "
        "minutes.",
    )  # fmt: skip


def test_age_counts_from_when_the_watch_saw_the_pod_if_later() -> None:
    # Timestamps have whole seconds: a pod created at 12:00:00.9 must not fail at 12:00:30.1.
    assert classify(pod(), now=CREATED + 31, settings=SETTINGS, seen_at=CREATED + 2) is None


def test_placed_pod_gets_the_longer_start_limit() -> None:
    placed = pod(waiting="ContainerCreating", node="n1")
    assert classify(placed, now=CREATED + 299, settings=SETTINGS) is None
    failure = classify(placed, now=CREATED + 301, settings=SETTINGS)
    assert failure is not None and failure.reason == "start_timeout"
    assert "(ContainerCreating)" in failure.message


@pytest.mark.parametrize("phase", ["Running", "Succeeded", "Failed"])
def test_pods_past_pending_are_not_start_failures(phase: str) -> None:
    assert classify(pod(phase=phase, waiting="ErrImagePull"), now=CREATED + 999,
                    settings=SETTINGS) is None  # fmt: skip


class FailingKube:
    """A KubeClient whose deletes fail."""

    async def delete_pod(self, namespace: str, name: str) -> bool:
        raise RuntimeError("API server down")


def test_one_failing_step_never_skips_the_others() -> None:
    done: list[str] = []

    async def record(failure: StartFailure) -> None:
        raise RuntimeError("Redis down")

    async def release(kernel_id: str) -> None:
        done.append(kernel_id)

    failure = classify(pod(waiting="ErrImagePull", node="n"), now=CREATED, settings=SETTINGS)
    assert failure is not None
    asyncio.run(FailStart(FailingKube(), record=record, release=release)(failure))  # type: ignore[arg-type]
    assert done == ["k1"]


@dataclass
class FakeScheduler:
    decision: Any

    async def admit(self, **kwargs: Any) -> Any:
        return self.decision

    async def admission(self, kernel_id: str, *, wait_s: float = 0) -> Any:
        return self.decision

    other = "passed through"


def lease(**changes: Any) -> Lease:
    fields = dict(kernel_id="k1", user="alice", kernelspec="python-gpu", pool="gpu", cpus=1.5,
                  memory=4 * 2**30, gpus=1, gpu_devices=[1], state="starting", created=1.0,
                  last_activity=1.0)  # fmt: skip
    return Lease(**{**fields, **changes})


def test_admissions_carry_the_placement_for_the_pod_template() -> None:
    admitted = Admission(lease=lease(), env={"CUDA_VISIBLE_DEVICES": "1"}, created=True)
    wrapped = WithPlacementEnv(FakeScheduler(admitted))
    result = asyncio.run(wrapped.admit(kernel_id="k1"))
    assert result.env == {"CUDA_VISIBLE_DEVICES": "1", "KERNEL_CPUS": "1.5",
                          "KERNEL_MEMORY": str(4 * 2**30), "KERNEL_GPUS": "1"}  # fmt: skip
    assert asyncio.run(wrapped.admission("k1")).env == result.env
    assert wrapped.other == "passed through"
    assert placement_env(lease(cpus=2.0, gpus=0))["KERNEL_CPUS"] == "2"


def test_queued_requests_pass_unchanged() -> None:
    queued = Queued(kernel_id="k1", pool="gpu", position=2, deadline=9.0)
    assert asyncio.run(WithPlacementEnv(FakeScheduler(queued)).admit()) is queued
