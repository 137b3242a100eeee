"""`kernelspecs build --backend kubernetes`: kernel.json, pod template, launcher, pool manifests.

Each shipped kernelspec's pod template is rendered the way the launcher renders it at a
kernel start and validated against the Kubernetes schemas (strict, 1.30 and newer).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from kernelfleet.cli import main
from kernelfleet.config import load_config
from kernelfleet.kernelspecs.launch_kubernetes import LaunchError, launch_values, render_pod
from kernelfleet.kernelspecs.render_kubernetes import (
    KUBERNETES_PROCESS_PROXY,
    LAUNCHER_SOURCE,
    kernel_pod,
)
from kernelfleet.kernelspecs.render_kubernetes_pools import (
    PAUSE_IMAGE,
    dump_manifests,
    pool_manifests,
)
from kernelfleet.kernelspecs.spec import KernelSpec, load_kernelspecs
from kernelfleet.kubernetes_settings import (
    KubernetesSettings,
    PoolPlacement,
    Toleration,
)
from tests.support.kubernetes_versions import KUBERNETES_VERSIONS, validate

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ["python-cpu", "python-cpu-large", "python-gpu"]
KERNEL_ID = "6f1d3c2a-8b7e-4f60-9a51-0c2e4d8b7a13"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the repo's kernelfleet.yaml and kernelspecs/ as the working folder."""
    shutil.copy(REPO / "kernelfleet.yaml", tmp_path / "kernelfleet.yaml")
    shutil.copytree(REPO / "kernelspecs", tmp_path / "kernelspecs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def build(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["--config", "kernelfleet.yaml", "kernelspecs", "build", "--backend",
                 "kubernetes", "--output", "out", *args])  # fmt: skip
    out, err = capsys.readouterr()
    return code, out, err


def specs() -> dict[str, KernelSpec]:
    config = load_config(REPO / "kernelfleet.yaml")
    return load_kernelspecs(config.kernelspecs_dir, config)


def launch(template: str, **env: str) -> dict[str, Any]:
    """The pod the launcher would create for ``template`` with ``env``."""
    values = launch_values(
        kernel_id=KERNEL_ID, response_address="10.1.2.3:8877", public_key="PUBKEY",
        port_range="0..0", env={"KERNEL_USERNAME": "alice", **env},
        resources={"cpus": 1, "memory": 2**31, "gpus": 0},
    )  # fmt: skip
    return render_pod(template, values)


def rendered(name: str, settings: KubernetesSettings | None = None, **env: str) -> dict:
    config = load_config(REPO / "kernelfleet.yaml")
    spec = specs()[name]
    return launch(kernel_pod(spec, config, settings or KubernetesSettings()), **env)


# --- kernel.json ------------------------------------------------------------------------


def test_build_renders_kernelspecs_for_the_kubernetes_process_proxy(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = build(capsys)
    assert (code, err) == (0, "")
    for name in SHIPPED:
        folder = project / "out" / "kernels" / name
        kernel = json.loads((folder / "kernel.json").read_text())
        proxy = kernel["metadata"]["process_proxy"]
        assert proxy["class_name"] == KUBERNETES_PROCESS_PROXY
        assert proxy["config"]["image_name"].startswith("kernelfleet/kernel-python")
        assert kernel["argv"][:2] == ["python", "{resource_dir}/scripts/launch_kubernetes.py"]
        for placeholder in ("{kernel_id}", "{response_address}", "{public_key}", "{port_range}"):
            assert placeholder in kernel["argv"]
        # One kernel namespace for the deployment, never EG's namespace-per-kernel default.
        assert kernel["env"]["KERNEL_NAMESPACE"] == "kernelfleet-kernels"
        assert kernel["metadata"]["kernelfleet"]["name"] == name
        assert (folder / "scripts" / "launch_kubernetes.py").read_bytes() == (
            LAUNCHER_SOURCE.read_bytes()
        )
        assert (folder / "scripts" / "kernel-pod.yaml.j2").is_file()
    again = build(capsys)
    assert again[0] == 0


def test_build_without_image_names_the_field(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = project / "kernelspecs" / "python-gpu" / "spec.yaml"
    data = yaml.safe_load(path.read_text())
    del data["kubernetes"]
    path.write_text(yaml.safe_dump(data))
    code, _, err = build(capsys)
    assert code == 2
    assert "python-gpu/spec.yaml: kubernetes.image: required by the kubernetes backend" in err
    assert not (project / "out").exists()


@pytest.mark.parametrize(
    ("kubernetes", "field", "reason"),
    [
        ({"image": "x y"}, "kubernetes.image", "is not an image reference"),
        ({"image": "a/b:1", "volumes": [{"name": "d", "mount_path": "/tmp/d", "claim": "c"}]},
         "kubernetes.volumes.0.mount_path", "would cover /tmp"),
        ({"image": "a/b:1", "volumes": [{"name": "d", "mount_path": "/d", "claim": "{user}"}]},
         "kubernetes.volumes.0.claim", "the only placeholder allowed is {username}"),
        ({"image": "a/b:1", "volumes": [{"name": "d", "mount_path": "/d"}]},
         "kubernetes.volumes.0.claim", "required field is missing"),
        ({"image": "a/b:1", "volumes": [{"name": "d", "mount_path": "/d", "claim": "a"},
                                        {"name": "d", "mount_path": "/e", "claim": "b"}]},
         "kubernetes.volumes", "volume name used twice: d"),
        ({"image": "a/b:1", "volum": []}, "kubernetes.volum", "did you mean 'volumes'?"),
    ],
)  # fmt: skip
def test_bad_kubernetes_fields_are_reported(
    project: Path,
    capsys: pytest.CaptureFixture[str],
    kubernetes: dict[str, Any],
    field: str,
    reason: str,
) -> None:
    path = project / "kernelspecs" / "python-cpu" / "spec.yaml"
    data = yaml.safe_load(path.read_text())
    data["kubernetes"] = kubernetes
    path.write_text(yaml.safe_dump(data))
    code = main(["--config", "kernelfleet.yaml", "kernelspecs", "validate"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"kernelspecs/python-cpu/spec.yaml: {field}: " in err and reason in err, err


def test_warm_kernels_cannot_have_per_user_volumes(project: Path, capsys: Any) -> None:
    path = project / "kernelspecs" / "python-cpu" / "spec.yaml"
    data = yaml.safe_load(path.read_text())
    data["warm_target"] = 2
    data["kubernetes"]["volumes"] = [{"name": "w", "mount_path": "/w", "claim": "h-{username}"}]
    path.write_text(yaml.safe_dump(data))
    assert main(["--config", "kernelfleet.yaml", "kernelspecs", "validate"]) == 2
    assert "depend on {username}" in capsys.readouterr().err


# --- the pod template -------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_pod_template_renders_and_validates(name: str) -> None:
    validate(rendered(name))


@pytest.mark.parametrize("name", SHIPPED)
def test_pod_runs_in_its_pool_as_non_root_without_token(name: str) -> None:
    spec = specs()[name]
    pod = rendered(name)
    pod_spec = pod["spec"]
    assert pod["metadata"]["namespace"] == "kernelfleet-kernels"
    assert pod_spec["nodeSelector"] == {"kernelfleet.io/pool": spec.pool}
    assert {"key": "kernelfleet.io/pool", "operator": "Equal", "value": spec.pool,
            "effect": "NoSchedule"} in pod_spec["tolerations"]  # fmt: skip
    gpu_toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert (gpu_toleration in pod_spec["tolerations"]) == (spec.pool == "gpu")
    assert pod_spec["priorityClassName"] == "kernelfleet-kernel"
    assert pod_spec["automountServiceAccountToken"] is False
    assert pod_spec["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }  # fmt: skip
    (container,) = pod_spec["containers"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["image"] == spec.kubernetes.image
    assert [v["name"] for v in pod_spec["volumes"]] == ["tmp", "home"]  # nothing undeclared


@pytest.mark.parametrize("name", SHIPPED)
def test_requests_and_limits_come_from_the_placement(name: str) -> None:
    spec = specs()[name]
    defaults = rendered(name)["spec"]["containers"][0]["resources"]
    assert defaults["requests"] == defaults["limits"]
    # The scheduler's placement (pinned by the gateway) wins over the kernelspec's numbers.
    gpus = str(spec.resources.gpus)
    placed = rendered(name, KERNEL_CPUS="2.5", KERNEL_MEMORY="3221225472", KERNEL_GPUS=gpus)
    resources = placed["spec"]["containers"][0]["resources"]
    expected = {"cpu": "2500m", "memory": "3221225472"}
    if spec.resources.gpus:
        expected["nvidia.com/gpu"] = gpus
    assert resources == {"requests": expected, "limits": expected}


def test_labels_name_owner_kernelspec_pool_and_warm_state() -> None:
    labels = rendered("python-gpu")["metadata"]["labels"]
    assert labels["kernel_id"] == KERNEL_ID and labels["component"] == "kernel"  # EG's lookup
    assert labels["kernelfleet.io/owner"] == "alice"
    assert labels["kernelfleet.io/kernelspec"] == "python-gpu"
    assert labels["kernelfleet.io/pool"] == "gpu"
    assert labels["kernelfleet.io/warm"] == "false"
    warm = rendered("python-gpu", KERNEL_WARM="true")["metadata"]["labels"]
    assert (warm["kernelfleet.io/warm"], warm["kernelfleet.io/owner"]) == ("true", "")


def test_hostile_user_names_stay_single_values() -> None:
    name = 'mallory"\nspec: {hostNetwork: true}\n#@EXAMPLE.com'
    pod = rendered("python-cpu", KERNEL_USERNAME=name)
    assert "hostNetwork" not in pod["spec"]
    assert pod["metadata"]["annotations"]["kernelfleet.io/owner"] == name
    label = pod["metadata"]["labels"]["kernelfleet.io/owner"]
    assert label.startswith("mallory-spec-hostnetwork-true") and len(label) <= 63
    validate(pod, KUBERNETES_VERSIONS[:1])


def test_only_declared_volumes_are_mounted_with_the_owners_claim() -> None:
    config = load_config(REPO / "kernelfleet.yaml")
    spec = specs()["python-cpu"]
    volumes = [
        {"name": "work", "mount_path": "/home/kernel/work", "claim": "home-{username}"},
        {"name": "data", "mount_path": "/data", "read_only": True, "claim": "datasets"},
    ]
    launch_spec = spec.kubernetes.model_validate(
        {"image": spec.kubernetes.image, "volumes": volumes}
    )
    template = kernel_pod(spec.model_copy(update={"kubernetes": launch_spec}), config,
                          KubernetesSettings())  # fmt: skip
    # Client-sent volumes are not even looked at: only the kernelspec's are in the template.
    pod = launch(template, KERNEL_USERNAME="Bob.Smith", KERNEL_VOLUMES="[{name: x}]")
    claims = {v["name"]: v.get("persistentVolumeClaim") for v in pod["spec"]["volumes"]}
    assert claims["work"]["claimName"].startswith("home-bob-smith-")
    assert claims["data"] == {"claimName": "datasets", "readOnly": True}
    assert set(claims) == {"tmp", "home", "work", "data"}
    mounts = {m["name"]: m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["work"] == "/home/kernel/work" and mounts["data"] == "/data"
    validate(pod, KUBERNETES_VERSIONS[-1:])


def test_settings_choose_namespace_and_pool_placement() -> None:
    settings = KubernetesSettings(
        namespace="team-kernels", kernel_uid=4242, kernel_gid=4242,
        pools={"gpu": PoolPlacement(node_selector={"cloud.example/accelerator": "h100"},
                                    tolerations=[Toleration(key="dedicated", value="ml",
                                                            effect="NoSchedule")],
                                    priority_class="gpu-kernels")},
    )  # fmt: skip
    pod = rendered("python-gpu", settings)
    assert pod["metadata"]["namespace"] == "team-kernels"
    assert pod["spec"]["nodeSelector"] == {"cloud.example/accelerator": "h100"}
    assert pod["spec"]["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    ]
    assert pod["spec"]["priorityClassName"] == "gpu-kernels"
    assert pod["spec"]["securityContext"]["runAsUser"] == 4242


def test_settings_refuse_root_and_bad_names() -> None:
    with pytest.raises(ValueError, match="never run as root"):
        KubernetesSettings(kernel_uid=0)
    with pytest.raises(ValueError, match="DNS label"):
        KubernetesSettings(namespace="Kernels_NS")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KERNEL_CPUS": "lots"}, "KERNEL_CPUS='lots' is not a number"),
        ({"KERNEL_USERNAME": ""}, "every kernel has an owner"),
        ({"KERNEL_GPUS": "0.5"}, "is not usable"),
    ],
)
def test_launcher_refuses_bad_values(env: dict[str, str], message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        launch_values(kernel_id=KERNEL_ID, response_address="", public_key="", port_range="",
                      env={"KERNEL_USERNAME": "alice", **env}, resources={})  # fmt: skip


def test_launcher_refuses_a_template_that_is_not_one_pod() -> None:
    values = launch_values(kernel_id=KERNEL_ID, response_address="", public_key="",
                           port_range="", env={"KERNEL_USERNAME": "a"}, resources={})  # fmt: skip
    with pytest.raises(LaunchError, match="one Pod"):
        render_pod("apiVersion: v1\nkind: Pod\n---\napiVersion: v1\nkind: Pod\n", values)
    with pytest.raises(LaunchError, match="v1 Pod"):
        render_pod("apiVersion: v1\nkind: Secret\n", values)
    with pytest.raises(LaunchError, match="unknown value"):
        render_pod("kind: {{ nope | tojson }}\n", values)


# --- pool manifests (placeholders, pre-pullers) -----------------------------------------


def test_pool_manifests_size_placeholders_and_pull_only_the_pools_images() -> None:
    config = load_config(REPO / "kernelfleet.yaml")
    manifests = pool_manifests(config, specs())
    by_name = {m["metadata"]["name"]: m for m in manifests}
    cpu = by_name["kernelfleet-placeholder-cpu"]["spec"]["template"]["spec"]
    # The largest cpu-pool kernelspec is python-cpu-large: 2 CPUs, 8 GiB.
    assert cpu["containers"][0]["resources"]["requests"] == {"cpu": "2", "memory": str(8 * 2**30)}
    assert cpu["priorityClassName"] == "kernelfleet-placeholder"
    assert cpu["nodeSelector"] == {"kernelfleet.io/pool": "cpu"}
    gpu = by_name["kernelfleet-placeholder-gpu"]["spec"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    pulled = {
        pool: [c["image"] for c in by_name[f"kernelfleet-prepuller-{pool}"]["spec"]["template"]
               ["spec"]["initContainers"]]
        for pool in ("cpu", "gpu")
    }  # fmt: skip
    assert pulled == {"cpu": ["kernelfleet/kernel-python:0.1.0"],
                      "gpu": ["kernelfleet/kernel-python-gpu:0.1.0"]}  # fmt: skip
    for manifest in manifests:
        assert manifest["spec"]["template"]["spec"]["containers"][0]["image"] == PAUSE_IMAGE
        validate(manifest)
    assert yaml.safe_load_all(dump_manifests(manifests))


def test_platform_config_kubernetes_section_is_used_when_present() -> None:
    from types import SimpleNamespace

    from kernelfleet.kubernetes_settings import kubernetes_settings

    chosen = KubernetesSettings(namespace="team-kernels")
    assert kubernetes_settings(SimpleNamespace(kubernetes=chosen)) is chosen
    assert kubernetes_settings(load_config(REPO / "kernelfleet.yaml")) == KubernetesSettings()
