"""A kernel start that cannot succeed on Kubernetes fails fast, from launcher to scheduler API.

The scheduler (its Kubernetes backend wired into the real HTTP app, on a real Redis) admits
a kernel; the kernel's pod cannot start; the pod watch records why, releases the lease and
deletes the pod; EG's launcher (kernelfleet's launch_kubernetes.py, run as EG runs it)
exits at once; ``GET /v1/start-failures/{kernel_id}`` tells the message. Runs against the
stand-in API server, or the real cluster of $KUBECONFIG.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes_asyncio import client

from kernelfleet.config import PlatformConfig, PoolConfig
from kernelfleet.kernelspecs.render_kubernetes import LAUNCHER_SOURCE, kernel_json, kernel_pod
from kernelfleet.kernelspecs.spec import KernelSpec
from kernelfleet.kubernetes_settings import KubernetesSettings, PoolPlacement
from scheduler.app import create_app
from scheduler.kubernetes import KubernetesBackend
from scheduler.kubernetes_watch import KubeClient
from scheduler.service import Scheduler
from scheduler.store import connect, describe
from tests.support.kube_cluster import ClusterUnderTest, kubernetes_under_test

REPO = Path(__file__).resolve().parents[2]
GATEWAY_PYTHON = REPO / ".venv-gateway" / "bin" / "python"
TOKEN = "service-token-for-tests"
UNPULLABLE = "registry.invalid/kernelfleet/no-such-image:0.0.0"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[ClusterUnderTest]:
    async with kubernetes_under_test(tmp_path) as found:
        yield found


def kernelspec_for(pool: str, *, image: str, secrets: bool = False) -> KernelSpec:
    extra: dict[str, Any] = {}
    if secrets:
        extra["secrets"] = [{"vault": "kv/data/team", "env": "WAREHOUSE_TOKEN", "key": "token"}]
    return KernelSpec(name="python-test", display_name="Test", pool=pool, groups=["*"],
                      resources={"cpus": 0.1, "memory": "64Mi", "gpus": 0},
                      kubernetes={"image": image}, **extra)  # fmt: skip


def settings_for(cluster: ClusterUnderTest, pool: str) -> KubernetesSettings:
    return KubernetesSettings(
        namespace=cluster.namespace, pending_limit_s=1,
        pools={pool: PoolPlacement(priority_class=cluster.priority_class)},
    )  # fmt: skip


class Stack:
    """The scheduler's app with the Kubernetes backend, and an HTTP client for it."""

    def __init__(self, backend: KubernetesBackend, scheduler: Scheduler, http: httpx.AsyncClient):
        self.backend, self.scheduler, self.http = backend, scheduler, http

    async def admit(self, kernel_id: str) -> httpx.Response:
        body = {"kernel_id": kernel_id, "user": "alice", "groups": [], "kernelspec": "python-test"}
        return await self.http.post("/v1/admissions", json=body)


@pytest.fixture
async def stack(cluster: ClusterUnderTest, redis_url: str) -> AsyncIterator[Stack]:
    pool = cluster.pool("cpu")
    platform = PlatformConfig(backend="kubernetes", pools={pool: PoolConfig(gpus=0)})
    specs = {"python-test": kernelspec_for(pool, image=UNPULLABLE)}
    kube = KubeClient(client.ApiClient(cluster.api_client.configuration))
    backend = KubernetesBackend(kube, platform, specs, settings=settings_for(cluster, pool))
    await cluster.add_node("n", pool=pool, cpu="2", memory="4Gi")
    redis = connect(redis_url)
    await backend.nodes.load()
    scheduler = Scheduler.from_config(redis, platform, pools=backend.pools, kernelspecs=specs,
                                      location=describe(redis_url))  # fmt: skip
    app = create_app(backend.attach(scheduler), token=TOKEN)  # type: ignore[arg-type]
    backend.add_routes(app)
    backend.pod_watch.tick_s = 0.1  # type: ignore[union-attr]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://scheduler",
                                 headers={"Authorization": f"token {TOKEN}"}) as http:  # fmt: skip
        await asyncio.sleep(0.3)  # the watches have listed
        yield Stack(backend, scheduler, http)
    await backend.aclose()
    await redis.aclose()


def write_kernelspec(folder: Path, spec: KernelSpec, settings: KubernetesSettings) -> Path:
    """The kubernetes kernelspec of ``spec`` as the build writes it, with test settings."""
    platform = PlatformConfig(backend="kubernetes", pools={spec.pool: PoolConfig(gpus=0)})
    (folder / "scripts").mkdir(parents=True)
    (folder / "kernel.json").write_text(json.dumps(kernel_json(spec, platform, settings)))
    (folder / "scripts" / "kernel-pod.yaml.j2").write_text(kernel_pod(spec, platform, settings))
    (folder / "scripts" / "launch_kubernetes.py").write_bytes(LAUNCHER_SOURCE.read_bytes())
    return folder


async def run_launcher(
    kernelspec: Path, cluster: ClusterUnderTest, kernel_id: str, **env: str
) -> tuple[int, str, float]:
    """Run launch_kubernetes.py as EG does (EG's Python); (exit code, stderr, seconds)."""
    if not GATEWAY_PYTHON.exists():
        pytest.skip("no .venv-gateway (EG's environment, with the kubernetes client)")
    kernel = json.loads((kernelspec / "kernel.json").read_text())
    argv = [a.replace("{resource_dir}", str(kernelspec)) for a in kernel["argv"]]
    values = {"{kernel_id}": kernel_id, "{port_range}": "0..0",
              "{response_address}": "10.9.8.7:8877", "{public_key}": "PUBLICKEY"}  # fmt: skip
    argv = [values.get(a, a) for a in argv]
    full_env = {"PATH": os.environ["PATH"], "KUBECONFIG": str(cluster.kubeconfig),
                "KERNEL_USERNAME": "alice", "KERNEL_LAUNCH_TIMEOUT": "30",
                **kernel["env"], **env}  # fmt: skip
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        str(GATEWAY_PYTHON), *argv[1:], env=full_env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode or 0, err.decode(), time.monotonic() - started


async def test_admission_hands_the_placement_to_the_pod_template(stack: Stack) -> None:
    answer = await stack.admit(str(uuid.uuid4()))
    assert answer.status_code == 201, answer.text
    env = answer.json()["env"]
    assert (env["KERNEL_CPUS"], env["KERNEL_MEMORY"], env["KERNEL_GPUS"]) == (
        "0.1",
        str(64 * 2**20),
        "0",
    )


async def test_failed_start_is_recorded_released_and_its_pod_deleted(
    stack: Stack, cluster: ClusterUnderTest, tmp_path: Path
) -> None:
    kernel_id = str(uuid.uuid4())
    assert (await stack.admit(kernel_id)).status_code == 201
    pool = cluster.pool("cpu")
    spec = kernelspec_for(pool, image=UNPULLABLE)
    settings = settings_for(cluster, pool)
    folder = write_kernelspec(tmp_path / "python-test", spec, settings)
    code, err, seconds = await run_launcher(folder, cluster, kernel_id)
    # Stand-in: its node tries the image (ErrImagePull). Real cluster: the test's node is a
    # tainted fake, so the pod is never placed (pending past 1 s). Either way: seconds.
    assert code == 3, err
    assert "was deleted before it started" in err
    assert seconds < 15
    answer = await stack.http.get(f"/v1/start-failures/{kernel_id}")
    assert answer.status_code == 200, answer.text
    failure = answer.json()
    expected = "pending_timeout" if cluster.real else "image_pull_failed"
    assert failure["reason"] == expected
    assert failure["message"].startswith("Kernel python-test could not start: ")
    assert await stack.scheduler.leases.get(kernel_id) is None  # quota and capacity are back
    assert not await cluster.pod_exists(f"kernel-{kernel_id}")


async def test_unknown_start_failure_is_404_in_the_error_shape(stack: Stack) -> None:
    answer = await stack.http.get(f"/v1/start-failures/{uuid.uuid4()}")
    assert answer.status_code == 404
    assert answer.json()["error"] == "unknown_start_failure"
    anonymous = await stack.http.get(f"/v1/start-failures/{uuid.uuid4()}",
                                     headers={"Authorization": ""})  # fmt: skip
    assert anonymous.status_code == 401


async def test_launcher_creates_the_pod_and_a_secret_it_owns(
    cluster: ClusterUnderTest, tmp_path: Path
) -> None:
    if cluster.standin is None:
        pytest.skip("needs a node that runs the kernel image")
    pool = cluster.pool("cpu")
    await cluster.add_node("n", pool=pool)
    spec = kernelspec_for(pool, image="kernelfleet/kernel-python:0.1.0", secrets=True)
    folder = write_kernelspec(tmp_path / "python-test", spec, settings_for(cluster, pool))
    kernel_id = str(uuid.uuid4())
    code, err, _ = await run_launcher(folder, cluster, kernel_id, WAREHOUSE_TOKEN="s3cret",
                                      KERNEL_IMAGE="evil/image:1", KERNEL_CPUS="0.5")  # fmt: skip
    assert code == 0, err
    pods = cluster.standin.objects["pods"]
    pod = pods[(cluster.namespace, f"kernel-{kernel_id}")]
    container = pod["spec"]["containers"][0]
    assert container["image"] == "kernelfleet/kernel-python:0.1.0"  # not the client's
    assert container["resources"]["limits"]["cpu"] == "500m"  # the placement
    assert pod["metadata"]["labels"]["kernelfleet.io/owner"] == "alice"
    assert "s3cret" not in json.dumps(pod)
    secret = cluster.standin.objects["secrets"][(cluster.namespace, f"kernel-{kernel_id}-env")]
    assert secret["data"] == {"WAREHOUSE_TOKEN": "s3cret"}
    (owner,) = secret["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"]) == ("Pod", f"kernel-{kernel_id}")


async def test_launcher_refuses_another_namespace(
    cluster: ClusterUnderTest, tmp_path: Path
) -> None:
    pool = cluster.pool("cpu")
    folder = write_kernelspec(tmp_path / "python-test", kernelspec_for(pool, image=UNPULLABLE),
                              settings_for(cluster, pool))  # fmt: skip
    code, err, _ = await run_launcher(folder, cluster, str(uuid.uuid4()),
                                      KERNEL_NAMESPACE="kube-system")  # fmt: skip
    assert code == 2 and "must not be overridden" in err


async def test_a_claimed_warm_kernels_pod_is_labelled_as_its_users(
    stack: Stack, cluster: ClusterUnderTest, tmp_path: Path
) -> None:
    if cluster.standin is None:
        pytest.skip("needs a node that runs the kernel image")
    pool = cluster.pool("cpu")
    spec = kernelspec_for(pool, image="kernelfleet/kernel-python:0.1.0")
    folder = write_kernelspec(tmp_path / "python-test", spec, settings_for(cluster, pool))
    kernel_id = str(uuid.uuid4())
    warm = await stack.http.post(
        "/v1/warm-pools/python-test/kernels", json={"kernel_id": kernel_id}
    )
    assert warm.status_code == 201, warm.text
    code, err, _ = await run_launcher(folder, cluster, kernel_id, KERNEL_WARM="true",
                                      KERNEL_USERNAME="kernelfleet-warm")  # fmt: skip
    assert code == 0, err
    pods = cluster.standin.objects["pods"]
    key = (cluster.namespace, f"kernel-{kernel_id}")
    assert pods[key]["metadata"]["labels"]["kernelfleet.io/warm"] == "true"  # nobody's yet

    body = {"kernel_id": kernel_id, "user": "Alice.Smith", "groups": [], "admin": False}
    claimed = await stack.http.post("/v1/warm-pools/python-test/claims", json=body)
    assert claimed.status_code == 200, claimed.text
    async with asyncio.timeout(10):  # relabelled in the background
        while pods[key]["metadata"]["labels"]["kernelfleet.io/warm"] != "false":
            await asyncio.sleep(0.05)
    metadata = pods[key]["metadata"]
    assert metadata["labels"]["kernelfleet.io/owner"].startswith("alice-smith-")  # label-safe
    assert metadata["annotations"]["kernelfleet.io/owner"] == "Alice.Smith"
    assert metadata["labels"]["kernelfleet.io/pool"] == pool  # the rest is kept
