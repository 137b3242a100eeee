"""`python -m scheduler` with ``backend: kubernetes``: pools come from the cluster at start,
and a cluster it cannot reach is a one-line start-up error (exit 2), not a traceback."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from kubernetes_asyncio import client

from kernelfleet.config import PlatformConfig, PoolConfig
from scheduler.__main__ import _kubernetes_backend
from tests.support.kube_standin import running_standin
from tests.support.ports import free_port


def startup(backend: str) -> SimpleNamespace:
    platform = PlatformConfig(backend=backend, pools={"cpu": PoolConfig(gpus=0)})
    return SimpleNamespace(platform=platform, kernelspecs={})


async def test_local_backend_needs_no_cluster() -> None:
    assert await _kubernetes_backend(startup("local")) is None  # type: ignore[arg-type]


async def test_kubernetes_backend_reads_pools_from_the_clusters_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_standin() as standin:
        api = client.ApiClient(client.Configuration(host=standin.url))
        node = {"metadata": {"name": "n1", "labels": {"kernelfleet.io/pool": "cpu"}},
                "status": {"allocatable": {"cpu": "16", "memory": "64Gi"},
                           "conditions": [{"type": "Ready", "status": "True"}]}}  # fmt: skip
        await client.CoreV1Api(api).create_node(node)
        await api.close()
        monkeypatch.setenv("KUBECONFIG", str(standin.write_kubeconfig(tmp_path / "kc.json")))
        backend = await _kubernetes_backend(startup("kubernetes"))  # type: ignore[arg-type]
        assert backend is not None
        try:
            assert backend.pools["cpu"].capacity() == {"cpus": 16, "memory": 64 * 2**30, "gpus": 0}
        finally:
            await backend.aclose()


async def test_unreachable_cluster_is_a_one_line_start_up_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    kubeconfig = tmp_path / "kc.yaml"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: c, cluster: {{server: 'http://127.0.0.1:{free_port()}'}}}}]\n"
        "users: [{name: u, user: {}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\n"
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    with pytest.raises(SystemExit) as exit_:
        await _kubernetes_backend(startup("kubernetes"))  # type: ignore[arg-type]
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("scheduler: cannot read the pools' nodes from Kubernetes: ")
    assert len(err.strip().splitlines()) == 1
