"""`kernelfleet up` stops on bad input before it starts or writes anything."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import yaml

from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]


def _up(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kernelfleet.cli", "--config", str(config), "up", "--skip-install"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_malformed_config_names_file_and_field(tmp_path: Path) -> None:
    config = tmp_path / "kernelfleet.yaml"
    config.write_text("state_dir: state\npools:\n  gpu:\n    gpus: two\n")
    result = _up(config)
    assert result.returncode == 2
    assert f"{config}: pools.gpu.gpus" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state").exists()


def test_port_in_use_names_the_port_and_the_setting(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "kernelfleet.yaml").read_text())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        raw["ports"]["gateway"] = port
        raw["state_dir"] = str(tmp_path / "state")
        raw["kernelspecs_dir"] = str(REPO / "kernelspecs")
        config = tmp_path / "kernelfleet.yaml"
        config.write_text(yaml.safe_dump(raw))
        result = _up(config)
    assert result.returncode == 2
    assert f"port {port} (ports.gateway in {config}) is in use" in result.stderr
    assert "change ports.gateway" in result.stderr
    assert not (tmp_path / "state").exists()


def test_bad_kernelspec_stops_up_with_file_and_field(tmp_path: Path) -> None:
    specs = tmp_path / "kernelspecs"
    for name in ("python-cpu", "python-gpu"):
        (specs / name).mkdir(parents=True)
        (specs / name / "spec.yaml").write_text(
            (REPO / "kernelspecs" / name / "spec.yaml").read_text()
        )
    (specs / "python-gpu" / "spec.yaml").write_text(
        "display_name: GPU\npool: gpu\nresources: {gpus: -1}\n"
    )
    raw = yaml.safe_load((REPO / "kernelfleet.yaml").read_text())
    raw.update(state_dir=str(tmp_path / "state"), kernelspecs_dir=str(specs))
    raw["ports"] = {name: free_port() for name in raw["ports"]}
    config = tmp_path / "kernelfleet.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = _up(config)
    assert result.returncode == 2
    assert "kernelspecs/python-gpu/spec.yaml: resources.gpus" in result.stderr
    assert "must not be negative" in result.stderr
    assert not (tmp_path / "state").exists()  # nothing was written or started
