"""kernelspecs validate/build: every problem is named (file, field, why); builds are atomic."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from jupyter_client.kernelspec import KernelSpec as JupyterKernelSpec

from kernelfleet.cli import main
from kernelfleet.config import load_config
from kernelfleet.kernelspecs import render
from kernelfleet.kernelspecs.render import LOCAL_PROCESS_PROXY, build_local

REPO = Path(__file__).resolve().parents[2]
GATEWAY_PYTHON = REPO / ".venv-gateway" / "bin" / "python"
SHIPPED = ["python-cpu", "python-cpu-large", "python-gpu"]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the repo's kernelfleet.yaml and kernelspecs/, as the working folder."""
    shutil.copy(REPO / "kernelfleet.yaml", tmp_path / "kernelfleet.yaml")
    shutil.copytree(REPO / "kernelspecs", tmp_path / "kernelspecs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def kernelspecs(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``kernelfleet --config kernelfleet.yaml kernelspecs ARGS``: (exit code, out, err)."""
    code = main(["--config", "kernelfleet.yaml", "kernelspecs", *args])
    out, err = capsys.readouterr()
    return code, out, err


def edit_spec(project: Path, folder: str, /, **changes: Any) -> None:
    """Change top-level fields of kernelspecs/<folder>/spec.yaml (None removes one)."""
    path = project / "kernelspecs" / folder / "spec.yaml"
    data = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data))


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under folder with its bytes and mtime."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def kernel_json(output: Path, name: str) -> dict[str, Any]:
    return json.loads((output / "kernels" / name / "kernel.json").read_text())


# --- validate ---------------------------------------------------------------------------


def test_shipped_specs_validate(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = kernelspecs(capsys, "validate")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "ok  python-cpu  pool=cpu gpus=0 groups=*",
        "ok  python-cpu-large  pool=cpu gpus=0 groups=analysts,ml",
        "ok  python-gpu  pool=gpu gpus=1 groups=ml",
    ]


@pytest.mark.parametrize(
    ("changes", "field", "reason"),
    [
        ({"idle_timout": "30m"}, "idle_timout", "unknown field 'idle_timout'; did you mean"),
        (
            {"resources": {"cpus": 1, "memory": "4Gi", "gpus": -1}},
            "resources.gpus",
            "gpus must not be negative, got -1",
        ),
        ({"pool": "tpu"}, "pool", "pool 'tpu' is not in kernelfleet.yaml (known: cpu, gpu)"),
        ({"name": "gpu"}, "name", "'gpu' must equal the folder name 'python-gpu'"),
        ({"idle_timeout": "30 minutes"}, "idle_timeout", "'30 minutes' is not a duration"),
        ({"pool": "cpu"}, "resources.gpus", "asks for 1 GPU but pool 'cpu' has no GPUs"),
        ({"display_name": None}, "display_name", "required field is missing"),
        ({"language": "r"}, "language", "Input should be 'python', got 'r'"),
        ({"warm_target": -1}, "warm_target", "warm_target must not be negative, got -1"),
    ],
)
def test_bad_spec_names_file_field_and_reason(
    project: Path,
    capsys: pytest.CaptureFixture[str],
    changes: dict[str, Any],
    field: str,
    reason: str,
) -> None:
    edit_spec(project, "python-gpu", **changes)
    code, out, err = kernelspecs(capsys, "validate")
    assert code == 2
    prefix = f"kernelfleet: error: kernelspecs/python-gpu/spec.yaml: {field}: "
    assert any(line.startswith(prefix) and reason in line for line in err.splitlines()), err
    assert "ok  python-gpu" not in out
    assert "ok  python-cpu  " in out  # one bad spec does not hide the good ones
    assert err.splitlines()[-1] == "kernelfleet: error: 1 error(s) in 1 of 3 kernelspec(s)"


def test_bad_yaml_names_file_and_line(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "kernelspecs" / "python-gpu" / "spec.yaml").write_text("pool: [gpu\nname: x\n")
    code, _, err = kernelspecs(capsys, "validate")
    assert code == 2
    assert "kernelfleet: error: kernelspecs/python-gpu/spec.yaml: line 2, column 5: " in err
    assert "not valid YAML" in err


def test_every_problem_of_every_file_is_reported(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit_spec(
        project,
        "python-gpu",
        name="other",
        pool="tpu",
        resources={"gpus": -1, "gpu": 1},
        max_lifetime="forever",
    )
    edit_spec(project, "python-cpu", pool="cpu", resources={"gpus": 2})
    code, out, err = kernelspecs(capsys, "validate")
    assert code == 2
    fields = [line.split(": ")[3] for line in err.splitlines()[:-1]]
    assert fields == [
        "resources.gpus",  # python-cpu: a GPU spec in the cpu pool
        "name",
        "resources.gpus",
        "resources.gpu",
        "max_lifetime",
        "pool",
    ]
    assert out == "ok  python-cpu-large  pool=cpu gpus=0 groups=analysts,ml\n"
    assert err.splitlines()[-1] == "kernelfleet: error: 6 error(s) in 2 of 3 kernelspec(s)"


def test_group_without_members_is_only_a_warning(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit_spec(project, "python-gpu", groups=["ml", "physicists"])
    code, out, err = kernelspecs(capsys, "validate")
    assert code == 0
    assert "ok  python-gpu  pool=gpu gpus=1 groups=ml,physicists" in out
    assert err == (
        "kernelfleet: warning: kernelspecs/python-gpu/spec.yaml: groups: no user in "
        "kernelfleet.yaml is in group 'physicists', so only admins see this\n"
    )


def test_gpu_spec_may_not_ask_for_more_gpus_than_the_pool_has(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit_spec(project, "python-gpu", resources={"gpus": 3})
    code, _, err = kernelspecs(capsys, "validate")
    assert code == 2
    assert "resources.gpus: asks for 3 GPUs but pool 'gpu' has only 2" in err


def test_empty_kernelspecs_folder_is_an_error(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.rmtree(project / "kernelspecs")
    (project / "kernelspecs").mkdir()
    code, _, err = kernelspecs(capsys, "validate")
    assert code == 2
    assert "kernelfleet: error: kernelspecs: no kernelspecs here" in err


def test_bad_kernelfleet_yaml_is_one_line(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "kernelfleet.yaml").write_text("pools: {}\n")
    code, _, err = kernelspecs(capsys, "validate")
    assert code == 2
    assert err.count("\n") == 1 and "pools: " in err


# --- build ------------------------------------------------------------------------------


def test_build_renders_the_contract_shape(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = kernelspecs(capsys, "build", "--backend", "local")
    output = project / ".kernelfleet" / "kernelspecs" / "local"
    assert (code, out, err) == (0, f"built 3 kernelspecs into {output}\n", "")
    assert sorted(p.name for p in (output / "kernels").iterdir()) == SHIPPED
    assert kernel_json(output, "python-cpu") == {
        "argv": [
            str(project / ".venv-kernel" / "bin" / "python"),
            "-m",
            "ipykernel_launcher",
            "-f",
            "{connection_file}",
        ],
        "display_name": "Python 3 (CPU)",
        "language": "python",
        "env": {},
        "metadata": {
            "process_proxy": {"class_name": LOCAL_PROCESS_PROXY},
            "kernelfleet": {
                "name": "python-cpu",
                "pool": "cpu",
                "groups": ["*"],
                "resources": {"cpus": 1.0, "memory": 2 * 2**30, "gpus": 0},
                "idle_timeout_s": 8 * 3600,
                "max_lifetime_s": 24 * 3600,
                "warm_target": 1,
                "simulated_gpu": False,
            },
        },
    }
    gpu = kernel_json(output, "python-gpu")["metadata"]["kernelfleet"]
    assert (gpu["idle_timeout_s"], gpu["simulated_gpu"], gpu["groups"]) == (1800, True, ["ml"])


def test_rendered_kernelspecs_load_in_jupyter_client(project: Path) -> None:
    output = build_local(load_config("kernelfleet.yaml"))
    for name in SHIPPED:
        spec = JupyterKernelSpec.from_resource_dir(str(output / "kernels" / name))
        assert spec.argv[1:] == ["-m", "ipykernel_launcher", "-f", "{connection_file}"]
        assert Path(spec.argv[0]).is_absolute()
        assert spec.language == "python" and spec.display_name.startswith("Python 3")
        assert spec.metadata["process_proxy"]["class_name"] == LOCAL_PROCESS_PROXY


@pytest.mark.skipif(not GATEWAY_PYTHON.exists(), reason="needs .venv-gateway (EG 3.3.0)")
def test_rendered_kernelspecs_load_in_enterprise_gateway(project: Path) -> None:
    output = build_local(load_config("kernelfleet.yaml"))
    script = (
        "import importlib, sys\n"
        "from jupyter_client.kernelspec import KernelSpecManager\n"
        "from enterprise_gateway.services.processproxies.processproxy import BaseProcessProxyABC\n"
        "for name, spec in sorted(KernelSpecManager().get_all_specs().items()):\n"
        "    module, _, cls = spec['spec']['metadata']['process_proxy']['class_name']"
        ".rpartition('.')\n"
        "    proxy = getattr(importlib.import_module(module), cls)\n"
        "    assert issubclass(proxy, BaseProcessProxyABC), proxy\n"
        "    print(name, proxy.__name__)\n"
    )
    env = {
        "JUPYTER_PATH": str(output),
        "JUPYTER_DATA_DIR": str(project / "data"),
        "HOME": str(project),
    }
    done = subprocess.run(
        [str(GATEWAY_PYTHON), "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    found = {line.split()[0]: line.split()[1] for line in done.stdout.splitlines()}
    assert {name: found.get(name) for name in SHIPPED} == dict.fromkeys(
        SHIPPED, "LocalProcessProxy"
    )


def test_local_python_is_relative_to_the_config_folder(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    edit_spec(project, "python-gpu", local={"python": "envs/gpu/bin/python"})
    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code = main(["--config", str(project / "kernelfleet.yaml"), "kernelspecs", "build"])
    _, err = capsys.readouterr()
    assert code == 0
    assert "local.python: " in err and "does not exist (yet)" in err  # a warning only
    argv = kernel_json(project / ".kernelfleet/kernelspecs/local", "python-gpu")["argv"]
    assert argv[0] == str(project / "envs" / "gpu" / "bin" / "python")


def fake_venv(project: Path, name: str) -> Path:
    """``<name>/bin/python`` as a symlink to this interpreter, as virtualenvs make it."""
    python = project / name / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.symlink_to(sys.executable)
    return python


def test_local_python_keeps_the_virtualenv_symlink(project: Path) -> None:
    python = fake_venv(project, "envs/gpu")
    edit_spec(project, "python-gpu", local={"python": "envs/gpu/bin/python"})
    output = build_local(load_config("kernelfleet.yaml"))
    # The base interpreter behind the link would run without the virtualenv's packages.
    assert kernel_json(output, "python-gpu")["argv"][0] == str(python)


def test_kernel_python_keeps_the_virtualenv_symlink(project: Path) -> None:
    python = fake_venv(project, ".venv-kernel")
    output = build_local(load_config("kernelfleet.yaml"))
    assert kernel_json(output, "python-cpu")["argv"][0] == str(python)


def test_rebuild_is_byte_identical_and_touches_nothing(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = project / "out"
    assert kernelspecs(capsys, "build", "--output", "out")[0] == 0
    before = snapshot(output)
    assert kernelspecs(capsys, "build", "--output", "out")[0] == 0
    assert snapshot(output) == before


def test_deleted_spec_disappears_from_the_output(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert kernelspecs(capsys, "build")[0] == 0
    shutil.rmtree(project / "kernelspecs" / "python-cpu-large")
    code, out, _ = kernelspecs(capsys, "build")
    output = project / ".kernelfleet" / "kernelspecs" / "local"
    assert (code, out) == (0, f"built 2 kernelspecs into {output}\n")
    assert sorted(p.name for p in (output / "kernels").iterdir()) == ["python-cpu", "python-gpu"]


def test_invalid_specs_leave_the_previous_output_untouched(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert kernelspecs(capsys, "build", "--output", "out")[0] == 0
    before = snapshot(project / "out")
    edit_spec(project, "python-gpu", pool="cpu", display_name="changed")
    code, out, err = kernelspecs(capsys, "build", "--output", "out")
    assert (code, out) == (2, "")
    assert "kernelspecs/python-gpu/spec.yaml: resources.gpus: " in err
    assert f"nothing was written to {project / 'out'}" in err
    assert snapshot(project / "out") == before
    assert sorted(p.name for p in project.iterdir()) == ["kernelfleet.yaml", "kernelspecs", "out"]


def test_failed_write_leaves_the_previous_output_untouched(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config("kernelfleet.yaml")
    output = build_local(config, project / "out")
    before = snapshot(output)
    edit_spec(project, "python-gpu", display_name="changed")

    def disk_full(folder: Path, files: dict[str, bytes]) -> None:
        (folder / "partial").write_text("half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(render, "_write_files", disk_full)
    with pytest.raises(OSError, match="No space left"):
        build_local(config, output)
    assert snapshot(output) == before
    assert sorted(p.name for p in project.iterdir()) == ["kernelfleet.yaml", "kernelspecs", "out"]


def test_build_refuses_to_replace_a_folder_it_did_not_write(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "notes").mkdir()
    (project / "notes" / "todo.txt").write_text("keep me")
    code, _, err = kernelspecs(capsys, "build", "--output", "notes")
    assert code == 2
    assert "notes: exists and was not written by `kernelfleet kernelspecs build`" in err
    assert (project / "notes" / "todo.txt").read_text() == "keep me"


def test_assets_beside_spec_yaml_are_copied(project: Path) -> None:
    logo = b"\x89PNG fake logo"
    (project / "kernelspecs" / "python-gpu" / "logo-64x64.png").write_bytes(logo)
    output = build_local(load_config("kernelfleet.yaml"))
    assert (output / "kernels" / "python-gpu" / "logo-64x64.png").read_bytes() == logo
    spec = JupyterKernelSpec.from_resource_dir(str(output / "kernels" / "python-gpu"))
    assert spec.resource_dir.endswith("python-gpu")
