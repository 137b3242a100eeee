"""The scheduler's Kubernetes side: pool capacity from nodes, fast start failures, placeholders.

Every test runs against the stand-in API server (tests/support/kube_standin.py), and against
the real cluster of $KUBECONFIG when it is set (tests/support/kube_cluster.py): the same
objects are created through the same API, and the cluster decides.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from kernelfleet.config import PlatformConfig, PoolConfig
from kernelfleet.kubernetes_settings import KubernetesSettings, PoolPlacement
from scheduler.kubernetes_nodes import NodeWatch, parse_quantity, pools_from_nodes
from scheduler.kubernetes_pods import PodWatch, StartFailure
from scheduler.kubernetes_warm import PlaceholderScaler, static_targets
from scheduler.kubernetes_watch import KubeClient, Resource, run_informer
from tests.support.kube_cluster import ClusterUnderTest, kubernetes_under_test

UNPULLABLE = "registry.invalid/kernelfleet/no-such-image:0.0.0"
PAUSE = "registry.k8s.io/pause:3.10"
GiB = 2**30


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[ClusterUnderTest]:
    async with kubernetes_under_test(tmp_path) as found:
        yield found


def platform_for(cluster: ClusterUnderTest, **pools: PoolConfig) -> PlatformConfig:
    return PlatformConfig(
        backend="kubernetes", pools={cluster.pool(name): pool for name, pool in pools.items()}
    )


def settings_for(cluster: ClusterUnderTest, **limits: float) -> KubernetesSettings:
    return KubernetesSettings(namespace=cluster.namespace, **limits)


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout_s: float = 10) -> None:
    """Wait until ``check()`` is true (polling), or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def kernel_pod(name: str, *, pool: str, image: str, kernel_id: str, selector: bool = True) -> dict:
    """A pod labelled like kernelfleet's kernel pods (restricted security, tiny requests)."""
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "kernel", "image": image,
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"},
                          "limits": {"cpu": "10m", "memory": "16Mi"}},
            "securityContext": {"allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]}},
        }],
    }  # fmt: skip
    if selector:
        spec["nodeSelector"] = {"kernelfleet.io/pool": pool}
    labels = {"app.kubernetes.io/name": "kernelfleet-kernel", "kernel_id": kernel_id,
              "component": "kernel", "kernelfleet.io/kernelspec": "python-test",
              "kernelfleet.io/pool": pool}  # fmt: skip
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
            "spec": spec}  # fmt: skip


async def _watching(watch: PodWatch) -> asyncio.Task[None]:
    task = asyncio.create_task(watch.run())
    await asyncio.sleep(0.2)  # the initial list is done
    return task


# --- pool capacity --------------------------------------------------------------------


def test_quantities_parse_like_kubernetes() -> None:
    assert parse_quantity("3800m") * 1000 == 3800 * 1
    assert parse_quantity("16Gi") == 16 * GiB
    assert parse_quantity("16314880Ki") == 16314880 * 1024
    assert parse_quantity("1e3") == 1000 and parse_quantity(2) == 2
    with pytest.raises(ValueError):
        parse_quantity("lots")


async def test_pool_capacity_is_the_allocatable_of_ready_labelled_nodes(
    cluster: ClusterUnderTest,
) -> None:
    cpu, gpu = cluster.pool("cpu"), cluster.pool("gpu")
    await cluster.add_node("c1", pool=cpu, cpu="4", memory="16Gi")
    await cluster.add_node("c2", pool=cpu, cpu="3800m", memory="8000Mi")
    await cluster.add_node("c3", pool=cpu, cpu="64", ready=False)  # NotReady: not counted
    await cluster.add_node("c4", pool=cpu, cpu="64", unschedulable=True)  # cordoned
    await cluster.add_node("g1", pool=gpu, cpu="8", memory="64Gi", gpus=2)
    platform = platform_for(cluster, cpu=PoolConfig(gpus=0),
                            gpu=PoolConfig(gpus="host", cost_per_hour=2.5))  # fmt: skip
    watch = NodeWatch(KubeClient(cluster.api_client), platform, settings_for(cluster))
    pools = await watch.load()
    assert pools[cpu].capacity() == {"cpus": 7.8, "memory": 16 * GiB + 8000 * 2**20, "gpus": 0}
    assert pools[gpu].capacity() == {"cpus": 8, "memory": 64 * GiB, "gpus": 2}
    assert pools[gpu].cost_per_hour == 2.5


def test_configured_numbers_and_overcommit_still_apply() -> None:
    node = {"metadata": {"name": "n", "labels": {"kernelfleet.io/pool": "cpu"}},
            "status": {"allocatable": {"cpu": "4", "memory": "8Gi"},
                       "conditions": [{"type": "Ready", "status": "True"}]}}  # fmt: skip
    platform = PlatformConfig(pools={"cpu": PoolConfig(cpus="host", memory=GiB, overcommit=2)})
    (pool,) = pools_from_nodes(platform, KubernetesSettings(), [node]).values()
    assert pool.capacity() == {"cpus": 8, "memory": 2 * GiB, "gpus": 0}


async def test_capacity_follows_nodes_as_they_come_and_go(cluster: ClusterUnderTest) -> None:
    cpu = cluster.pool("cpu")
    await cluster.add_node("a", pool=cpu, cpu="2", memory="4Gi")
    watch = NodeWatch(KubeClient(cluster.api_client), platform_for(cluster, cpu=PoolConfig()),
                      settings_for(cluster))  # fmt: skip
    pools = await watch.load()
    changes: list[float | int] = []
    watch.on_change = lambda: changes.append(pools[cpu].capacity()["cpus"])
    task = asyncio.create_task(watch.run())
    try:
        assert pools[cpu].capacity()["cpus"] == 2
        second = await cluster.add_node("b", pool=cpu, cpu="6", memory="4Gi")
        await eventually(lambda: pools[cpu].capacity()["cpus"] == 8)
        assert changes[-1] == 8  # the scheduler is told (queued requests may fit now)
        await cluster.delete_node(second)
        await eventually(lambda: pools[cpu].capacity()["cpus"] == 2)
    finally:
        task.cancel()


async def test_watch_lists_again_after_410_gone(cluster: ClusterUnderTest) -> None:
    if cluster.standin is None:
        pytest.skip("the stand-in can expire its history on demand; a real cluster cannot")
    seen: list[str] = []
    syncs: list[int] = []
    resource = Resource("nodes")

    async def informer() -> None:
        await run_informer(
            KubeClient(cluster.api_client),
            resource,
            watch_timeout_s=1,
            on_sync=lambda items: syncs.append(len(items)),
            on_event=lambda kind, obj: seen.append(obj["metadata"]["name"]),
        )

    task = asyncio.create_task(informer())
    try:
        await eventually(lambda: syncs == [0])
        first = await cluster.add_node("x", pool="p")
        await eventually(lambda: first in seen)
        lists = cluster.standin.requests.count(("GET", "/api/v1/nodes"))
        # The watch ends after 1 s; resuming from its last version then gets 410 Gone.
        cluster.standin.compact()
        await eventually(lambda: syncs == [0, 1], timeout_s=5)
        assert cluster.standin.requests.count(("GET", "/api/v1/nodes")) == lists + 1
    finally:
        task.cancel()


# --- fast start failures --------------------------------------------------------------


async def test_image_that_cannot_be_pulled_fails_the_start_at_once(
    cluster: ClusterUnderTest,
) -> None:
    failures: list[StartFailure] = []

    async def record(failure: StartFailure) -> None:
        failures.append(failure)

    cpu = cluster.pool("cpu")
    await cluster.add_node("n", pool=cpu)  # the stand-in places pods here; a cluster cannot
    watch = PodWatch(KubeClient(cluster.api_client), settings_for(cluster), on_failure=record,
                     tick_s=0.1)  # fmt: skip
    task = await _watching(watch)
    try:
        # On a real cluster the fake node is tainted, so a real node tries to pull.
        await cluster.create(kernel_pod("kernel-pull", pool=cpu, image=UNPULLABLE,
                                        kernel_id="k-pull", selector=False))  # fmt: skip
        await eventually(lambda: failures, timeout_s=60 if cluster.real else 5)
    finally:
        task.cancel()
    (failure,) = failures
    assert (failure.kernel_id, failure.reason) == ("k-pull", "image_pull_failed")
    assert UNPULLABLE in failure.message and "cannot be pulled" in failure.message
    assert failure.message.startswith("Kernel python-test could not start: ")


async def test_pod_pending_past_its_limit_fails_saying_why(cluster: ClusterUnderTest) -> None:
    failures: list[StartFailure] = []

    async def record(failure: StartFailure) -> None:
        failures.append(failure)

    empty = cluster.pool("empty")  # no node has this pool's label
    watch = PodWatch(KubeClient(cluster.api_client), settings_for(cluster, pending_limit_s=1),
                     on_failure=record, tick_s=0.1)  # fmt: skip
    task = await _watching(watch)
    started = time.monotonic()
    try:
        await cluster.create(kernel_pod("kernel-pending", pool=empty, image=PAUSE,
                                        kernel_id="k-pending"))  # fmt: skip
        await eventually(lambda: failures, timeout_s=15)
    finally:
        task.cancel()
    (failure,) = failures
    assert failure.reason == "pending_timeout"
    assert f"no node of pool {empty} had room for it within 1 s" in failure.message
    assert "node" in failure.message.split("(", 1)[1]  # the Kubernetes scheduler's own words
    assert time.monotonic() - started < 10  # seconds, not a silent minute


async def test_a_pod_that_starts_is_left_alone(cluster: ClusterUnderTest) -> None:
    if cluster.real:
        pytest.skip("needs a node that runs pods; the test's nodes are fakes")
    failures: list[StartFailure] = []

    async def record(failure: StartFailure) -> None:
        failures.append(failure)

    cpu = cluster.pool("cpu")
    await cluster.add_node("n", pool=cpu)
    watch = PodWatch(KubeClient(cluster.api_client), settings_for(cluster, pending_limit_s=0.3),
                     on_failure=record, tick_s=0.1)  # fmt: skip
    task = await _watching(watch)
    try:
        await cluster.create(kernel_pod("kernel-ok", pool=cpu, image=PAUSE, kernel_id="k-ok"))
        await asyncio.sleep(1.0)
    finally:
        task.cancel()
    assert failures == [] and watch.pending == {}


# --- warm capacity ----------------------------------------------------------------------


def placeholder_deployment(name: str, pool: str) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "kernelfleet-placeholder", "kernelfleet.io/pool": pool}
    pod = kernel_pod("x", pool=pool, image=PAUSE, kernel_id="-")["spec"]
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "labels": labels},
            "spec": {"replicas": 0, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": pod}}}  # fmt: skip


async def test_placeholders_follow_the_warm_targets(cluster: ClusterUnderTest) -> None:
    cpu, gpu = cluster.pool("cpu"), cluster.pool("gpu")
    kube = KubeClient(cluster.api_client)
    await cluster.create(placeholder_deployment(f"kernelfleet-placeholder-{cpu}", cpu))
    targets = {cpu: 2, gpu: 1}  # gpu has no Deployment: logged, skipped, cpu still scaled

    async def read() -> dict[str, int]:
        return targets

    scaler = PlaceholderScaler(kube, settings_for(cluster), targets=read)
    assert await scaler.sync() == {cpu: 2}
    assert await kube.scale(cluster.namespace, f"kernelfleet-placeholder-{cpu}") == 2
    assert await scaler.sync() == {}  # already right: nothing written
    targets[cpu] = 0
    assert await scaler.sync() == {cpu: 0}


def test_static_targets_sum_the_kernelspecs_of_each_pool() -> None:
    from kernelfleet.kernelspecs.spec import KernelSpec

    specs = {n: KernelSpec(name=n, display_name=n, pool=p, warm_target=w)
             for n, p, w in (("a", "cpu", 1), ("b", "cpu", 2), ("c", "gpu", 0))}  # fmt: skip
    assert asyncio.run(static_targets(specs)()) == {"cpu": 3, "gpu": 0}


def test_pool_placement_is_what_kernel_pods_use() -> None:
    settings = KubernetesSettings(pools={"gpu": PoolPlacement(node_selector={"gpu": "h100"})})
    assert settings.placement("gpu", has_gpus=True).node_selector == {"gpu": "h100"}
    assert settings.placement("cpu", has_gpus=False).tolerations == [
        {"key": "kernelfleet.io/pool", "operator": "Equal", "value": "cpu", "effect": "NoSchedule"}
    ]
