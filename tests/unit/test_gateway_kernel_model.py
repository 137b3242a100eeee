"""Listing kernels while one is still starting answers, in EG's own environment."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GATEWAY_PYTHON = REPO / ".venv-gateway" / "bin" / "python"

# A kernel in the manager's table before jupyter_server set last_activity/execution_state,
# which is where it sits while EG awaits its readiness.
SCRIPT = """
import json
from gateway.server.manager import KernelfleetMappingKernelManager
km = KernelfleetMappingKernelManager()
class Starting:
    kernel_name = "python-cpu"
km._kernels["k1"] = Starting()
print(json.dumps(km.list_kernels(), default=str))
"""


@pytest.mark.skipif(not GATEWAY_PYTHON.exists(), reason=".venv-gateway not built")
def test_a_starting_kernel_is_listed_as_starting(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(GATEWAY_PYTHON), "-c", SCRIPT], capture_output=True, text=True, cwd=REPO,
        timeout=60, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    [model] = json.loads(result.stdout.strip().splitlines()[-1])
    assert model["id"] == "k1" and model["execution_state"] == "starting"
