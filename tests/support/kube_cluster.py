"""The same Kubernetes tests against the stand-in API server or a real cluster.

:func:`kubernetes_under_test` gives the stand-in (:mod:`tests.support.kube_standin`) unless
``KUBECONFIG`` is set; then it gives that cluster, with a namespace, a PriorityClass and
nodes of its own, all removed afterwards.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from tests.support.kube_standin import KubeStandin, now_iso, running_standin


@dataclass
class ClusterUnderTest:
    """What a test needs of a cluster, the same for the stand-in and a real one.

    Everything is created through the API (nodes too), under names unique to the test,
    and removed afterwards. On a real cluster the nodes it creates are fakes (no kubelet):
    they carry a NoSchedule taint so that nothing but the scheduler's arithmetic uses them.
    """

    api_client: Any
    namespace: str
    kubeconfig: Path
    prefix: str
    priority_class: str
    standin: KubeStandin | None = None
    _nodes: list[str] = field(default_factory=list)

    @property
    def real(self) -> bool:
        return self.standin is None

    def pool(self, name: str) -> str:
        """A pool name of this test (so a real cluster's own labels never match)."""
        return f"{self.prefix}-{name}"

    async def add_node(
        self, name: str, *, pool: str, cpu: str = "4", memory: str = "16Gi", gpus: int = 0,
        ready: bool = True, unschedulable: bool = False,
    ) -> str:  # fmt: skip
        """Create a node in ``pool`` with this allocatable; returns its full name."""
        full = f"{self.prefix}-{name}"
        allocatable = {"cpu": cpu, "memory": memory, "pods": "110"}
        if gpus:
            allocatable["nvidia.com/gpu"] = str(gpus)
        condition = {"type": "Ready", "status": "True" if ready else "False",
                     "reason": "KubeletReady", "lastHeartbeatTime": now_iso(),
                     "lastTransitionTime": now_iso()}  # fmt: skip
        body = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": full, "labels": {"kernelfleet.io/pool": pool}},
            "spec": {"unschedulable": unschedulable,
                     "taints": [{"key": "kernelfleet.io/test-fake", "value": "true",
                                 "effect": "NoSchedule"}]},
            "status": {"capacity": allocatable, "allocatable": allocatable,
                       "conditions": [condition]},
        }  # fmt: skip
        await client.CoreV1Api(self.api_client).create_node(body)
        self._nodes.append(full)
        return full

    async def delete_node(self, full_name: str) -> None:
        await client.CoreV1Api(self.api_client).delete_node(full_name)
        self._nodes.remove(full_name)

    async def create(self, manifest: dict[str, Any]) -> None:
        """Create a namespaced Pod or Deployment in the test namespace."""
        if manifest["kind"] == "Pod":
            await client.CoreV1Api(self.api_client).create_namespaced_pod(self.namespace, manifest)
        else:
            await client.AppsV1Api(self.api_client).create_namespaced_deployment(
                self.namespace, manifest
            )

    async def pod_exists(self, name: str) -> bool:
        try:
            await client.CoreV1Api(self.api_client).read_namespaced_pod(name, self.namespace)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return True

    async def cleanup(self) -> None:
        core = client.CoreV1Api(self.api_client)
        for name in list(self._nodes):
            await core.delete_node(name)
        if self.real:
            await core.delete_namespace(self.namespace)
            await client.SchedulingV1Api(self.api_client).delete_priority_class(self.priority_class)


async def _real_cluster(prefix: str, kubeconfig: Path) -> ClusterUnderTest:
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    api = client.ApiClient(configuration)
    cluster = ClusterUnderTest(api, prefix, kubeconfig, prefix, prefix)
    await client.CoreV1Api(api).create_namespace({"metadata": {"name": prefix}})
    await client.CoreV1Api(api).create_namespaced_service_account(
        prefix, {"metadata": {"name": "kernelfleet-kernel"}, "automountServiceAccountToken": False}
    )
    await client.SchedulingV1Api(api).create_priority_class(
        {"metadata": {"name": prefix}, "value": 1000, "description": "kernelfleet tests"}
    )
    return cluster


@asynccontextmanager
async def kubernetes_under_test(tmp_path: Path) -> AsyncIterator[ClusterUnderTest]:
    """The stand-in, or the cluster of $KUBECONFIG when it is set (nodes and pods are real)."""
    prefix = f"kftest-{secrets.token_hex(3)}"
    kubeconfig = os.environ.get("KUBECONFIG")
    if kubeconfig:
        cluster = await _real_cluster(prefix, Path(kubeconfig))
        try:
            yield cluster
        finally:
            await cluster.cleanup()
            await cluster.api_client.close()
        return
    async with running_standin() as standin:
        configuration = client.Configuration(host=standin.url)
        api = client.ApiClient(configuration)
        path = standin.write_kubeconfig(tmp_path / "kubeconfig.json")
        cluster = ClusterUnderTest(api, "kernelfleet-kernels", path, prefix, "kernelfleet-kernel",
                                   standin=standin)  # fmt: skip
        try:
            yield cluster
        finally:
            await cluster.cleanup()
            await api.close()
