"""images/: one Dockerfile per component, non-root, multi-stage, versions pinned and consistent
with pyproject.toml, and every image that deploy/ and the kernelspecs name is built here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from kernelfleet.kernelspecs.render_kubernetes import KERNEL_HOME, KERNEL_LAUNCHER_IN_IMAGE
from kernelfleet.kubernetes_settings import KubernetesSettings

REPO = Path(__file__).resolve().parents[2]
IMAGES = ["hub", "notebook", "gateway", "scheduler", "kernel-python", "kernel-python-gpu"]
#: The pyproject extra each component image installs from the repository.
EXTRAS = {"hub": "hub", "notebook": "notebook,hub", "gateway": "gateway",
          "scheduler": "scheduler"}  # fmt: skip
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]


def dockerfile(name: str) -> str:
    return (REPO / "images" / name / "Dockerfile").read_text()


def stages(text: str) -> list[str]:
    """The Dockerfile's stages (text from each FROM to the next)."""
    parts = re.split(r"(?m)^(?=FROM )", text)
    return [p for p in parts if p.startswith("FROM ")]


def args(text: str) -> dict[str, str]:
    """Every ``ARG NAME=value`` of a Dockerfile."""
    return dict(re.findall(r"(?m)^ARG ([A-Z_]+)=(\S+)$", text))


def pins(text: str) -> dict[str, str]:
    """``package==version`` of every pip install, ARG references resolved."""
    values = args(text)
    resolved = re.sub(r"\$\{([A-Z_]+)\}", lambda m: values.get(m.group(1), m.group(0)), text)
    found = re.findall(r'"([A-Za-z0-9_.-]+)==([0-9][^"\s]*)"', resolved)
    return {canonicalize_name(name): version for name, version in found}


def pyproject_requirements() -> dict[str, list[Requirement]]:
    """Every requirement of pyproject.toml (dependencies and all extras), by package name."""
    found: dict[str, list[Requirement]] = {}
    extras = PYPROJECT["project"]["optional-dependencies"]
    for text in PYPROJECT["project"]["dependencies"] + [r for e in extras.values() for r in e]:
        requirement = Requirement(text)
        found.setdefault(canonicalize_name(requirement.name), []).append(requirement)
    return found


@pytest.mark.parametrize("name", IMAGES)
def test_image_is_multi_stage_and_runs_as_non_root(name: str) -> None:
    text = dockerfile(name)
    parts = stages(text)
    assert len(parts) >= 2, "build in one stage, copy only the result into the final image"
    users = re.findall(r"(?m)^USER (\S+)$", parts[-1])
    assert users, "the final stage must switch to a non-root USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]
    assert (REPO / "images" / name / "Dockerfile.dockerignore").is_file()


@pytest.mark.parametrize("name", IMAGES)
def test_base_image_is_pinned_and_python_fits_pyproject(name: str) -> None:
    base = args(dockerfile(name))["PYTHON_IMAGE"]
    assert base == args(dockerfile("scheduler"))["PYTHON_IMAGE"], "one Python for all images"
    match = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-\w+", base)
    assert match, f"{base}: pin the patch version and the Debian release"
    python = ".".join(match.groups())
    assert python in SpecifierSet(PYPROJECT["project"]["requires-python"])
    for line in re.findall(r"(?m)^FROM (\S+)", dockerfile(name)):
        assert line == "${PYTHON_IMAGE}", f"FROM {line}: use the pinned PYTHON_IMAGE"


@pytest.mark.parametrize("name", IMAGES)
def test_pins_agree_with_pyproject(name: str) -> None:
    text = dockerfile(name)
    requirements = pyproject_requirements()
    for package, version in pins(text).items():
        for requirement in requirements.get(package, []):
            assert version in requirement.specifier, f"{package}=={version} vs {requirement}"
    for arg, value in args(text).items():
        if arg.endswith("_VERSION"):
            assert re.fullmatch(r"\d+(\.\d+)+", value), f"{arg}={value} is not a pinned version"
    unpinned = re.findall(r"pip install[^\n]*\n(?:[^\n]*\\\n)*", text)
    for command in unpinned:
        for token in re.findall(r'"([^"]+)"', command):
            if not token.startswith((".", "https://")) and "==" not in token:
                pytest.fail(f"{name}: {token} is not pinned")


def test_enterprise_gateway_launcher_comes_from_the_pinned_release() -> None:
    (pinned,) = [r for r in pyproject_requirements()["jupyter-enterprise-gateway"]]
    for name in ("kernel-python", "kernel-python-gpu"):
        version = args(dockerfile(name))["ENTERPRISE_GATEWAY_VERSION"]
        assert str(pinned.specifier) == f"=={version}"


@pytest.mark.parametrize(("name", "extra"), sorted(EXTRAS.items()))
def test_component_images_install_their_pyproject_extra(name: str, extra: str) -> None:
    assert f'pip install ".[{extra}]"' in dockerfile(name)


@pytest.mark.parametrize("name", ["kernel-python", "kernel-python-gpu"])
def test_kernel_images_match_the_pod_template(name: str) -> None:
    final = stages(dockerfile(name))[-1]
    settings = KubernetesSettings()
    assert f" {KERNEL_LAUNCHER_IN_IMAGE}\n" in final  # where the pod's command looks for it
    assert f"USER {settings.kernel_uid}:{settings.kernel_gid}" in final
    assert f"--uid {settings.kernel_uid}" in final and f"--home-dir {KERNEL_HOME}" in final
    assert "ipykernel" in pins(dockerfile(name)) and "pycryptodomex" in pins(dockerfile(name))


def test_gpu_image_pins_cuda_and_pytorch() -> None:
    values = args(dockerfile("kernel-python-gpu"))
    assert re.fullmatch(r"\d+\.\d+", values["CUDA_VERSION"])
    assert "torch" in pins(dockerfile("kernel-python-gpu"))


def test_every_kernelfleet_image_used_is_built_here_with_the_project_version() -> None:
    used: set[str] = set()
    for path in list((REPO / "deploy").rglob("*.yaml")) + list(
        (REPO / "kernelspecs").rglob("*.yaml")
    ):
        used |= set(re.findall(r"kernelfleet/[a-z0-9-]+:[0-9A-Za-z.]+", path.read_text()))
    values = yaml.safe_load((REPO / "deploy" / "jupyterhub" / "values.yaml").read_text())
    for part in (values["hub"], values["singleuser"]):
        used.add(f"{part['image']['name']}:{part['image']['tag']}")
    assert {u.split(":")[0].split("/")[1] for u in used} == set(IMAGES)
    for image in used:
        name, tag = image.split(":")
        assert tag == VERSION, image
        assert (REPO / "images" / name.split("/")[1] / "Dockerfile").is_file(), image


def test_pyproject_extras_carry_the_kubernetes_dependencies() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    scheduler = {canonicalize_name(Requirement(r).name) for r in extras["scheduler"]}
    dev = {canonicalize_name(Requirement(r).name) for r in extras["dev"]}
    assert "kubernetes-asyncio" in scheduler, "the scheduler image needs kubernetes_asyncio"
    assert "kubernetes-validate" in dev, "the deploy tests need kubernetes-validate"
