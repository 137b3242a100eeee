"""Stock Enterprise Gateway 3.3.0 with a rendered kubernetes kernelspec: a start whose pod
cannot run fails in seconds, not at EG's launch timeout.

EG runs from .venv-gateway with its own KubernetesProcessProxy (only its in-cluster config
is swapped for $KUBECONFIG / the stand-in's kubeconfig); it runs kernelfleet's launcher,
which creates the pod; the scheduler's pod watch deletes it as unstartable; EG answers 500.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from kernelfleet.config import PlatformConfig, PoolConfig
from kernelfleet.kernelspecs.render_kubernetes import LAUNCHER_SOURCE, kernel_json, kernel_pod
from kernelfleet.kernelspecs.spec import KernelSpec
from kernelfleet.kubernetes_settings import KubernetesSettings, PoolPlacement
from scheduler.kubernetes_pods import PodWatch, StartFailure
from scheduler.kubernetes_watch import KubeClient
from tests.support.kube_cluster import ClusterUnderTest, kubernetes_under_test
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
GATEWAY_PYTHON = REPO / ".venv-gateway" / "bin" / "python"
LAUNCH_TIMEOUT_S = 60
# EG's k8s module loads the in-cluster config at import; outside a pod use the kubeconfig.
RUN_EG = (
    "import kubernetes.config as c\n"
    "c.load_incluster_config = lambda *a, **k: c.load_kube_config()\n"
    "from enterprise_gateway.enterprisegatewayapp import launch_instance\n"
    "launch_instance()\n"
)

pytestmark = pytest.mark.skipif(not GATEWAY_PYTHON.exists(), reason="no .venv-gateway")


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[ClusterUnderTest]:
    async with kubernetes_under_test(tmp_path) as found:
        yield found


def write_kernelspecs(root: Path, cluster: ClusterUnderTest) -> KubernetesSettings:
    """One kubernetes kernelspec under ``root/kernels`` whose pool has no room."""
    pool = cluster.pool("empty")
    spec = KernelSpec(name="python-test", display_name="Test", pool=pool,
                      resources={"cpus": 0.1, "memory": "64Mi"},
                      kubernetes={"image": "registry.invalid/kernelfleet/none:0.0.0"})  # fmt: skip
    platform = PlatformConfig(backend="kubernetes", pools={pool: PoolConfig(gpus=0)})
    settings = KubernetesSettings(namespace=cluster.namespace, pending_limit_s=1,
                                  pools={pool: PoolPlacement(
                                      priority_class=cluster.priority_class)})  # fmt: skip
    folder = root / "kernels" / spec.name
    (folder / "scripts").mkdir(parents=True)
    (folder / "kernel.json").write_text(json.dumps(kernel_json(spec, platform, settings)))
    (folder / "scripts" / "kernel-pod.yaml.j2").write_text(kernel_pod(spec, platform, settings))
    (folder / "scripts" / "launch_kubernetes.py").write_bytes(LAUNCHER_SOURCE.read_bytes())
    return settings


async def start_eg(
    tmp_path: Path, cluster: ClusterUnderTest, port: int
) -> asyncio.subprocess.Process:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "KUBECONFIG": str(cluster.kubeconfig),
           "JUPYTER_PATH": str(tmp_path / "jupyter"), "EG_RESPONSE_PORT": str(free_port()),
           "EG_KERNEL_LAUNCH_TIMEOUT": str(LAUNCH_TIMEOUT_S)}  # fmt: skip
    log = (tmp_path / "eg.log").open("w")
    return await asyncio.create_subprocess_exec(
        str(GATEWAY_PYTHON), "-c", RUN_EG, f"--EnterpriseGatewayApp.port={port}",
        "--EnterpriseGatewayApp.ip=127.0.0.1", env=env, stdout=log, stderr=log,
    )  # fmt: skip


async def test_enterprise_gateway_start_fails_fast_when_the_pod_cannot_start(
    cluster: ClusterUnderTest, tmp_path: Path
) -> None:
    settings = write_kernelspecs(tmp_path / "jupyter", cluster)
    failures: list[StartFailure] = []
    kube = KubeClient(cluster.api_client)

    async def fail_start(failure: StartFailure) -> None:  # what FailStart does to the pod
        failures.append(failure)
        await kube.delete_pod(failure.namespace, failure.pod)

    watch = asyncio.create_task(PodWatch(kube, settings, on_failure=fail_start, tick_s=0.1).run())
    port = free_port()
    eg = await start_eg(tmp_path, cluster, port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=90) as http:
            for _ in range(150):
                try:
                    specs = (await http.get("/api/kernelspecs")).json()["kernelspecs"]
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            assert "python-test" in specs
            started = time.monotonic()
            answer = await http.post("/api/kernels", json={
                "name": "python-test", "env": {"KERNEL_USERNAME": "alice"}})  # fmt: skip
            seconds = time.monotonic() - started
    finally:
        eg.terminate()
        try:
            await asyncio.wait_for(eg.wait(), 10)
        except asyncio.TimeoutError:  # stuck in a launch: it must not outlive the test
            eg.kill()
            await eg.wait()
        watch.cancel()
    log = (tmp_path / "eg.log").read_text()
    assert answer.status_code == 500, log
    assert "Error occurred during launch" in answer.json()["reason"]
    assert seconds < 15 < LAUNCH_TIMEOUT_S, log  # not the launch timeout
    (failure,) = failures
    assert failure.reason == "pending_timeout" and "had room for it" in failure.message
    assert "was deleted before it started" in log  # the launcher said why in EG's log
