"""Snippets run inside the gateway virtualenv, on EG's own pyzmq (< 25) and tornado.

Unit tests of code that runs inside Enterprise Gateway pass a prelude (setup shared by a
module's cases) and a case body; the body leaves what it observed in a dict ``result``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GATEWAY_PYTHON = REPO / ".venv-gateway" / "bin" / "python"

needs_gateway_venv = pytest.mark.skipif(
    not GATEWAY_PYTHON.exists(), reason="Enterprise Gateway venv not built"
)


def run_in_gateway(prelude: str, body: str, *, timeout_s: float = 60) -> dict:
    """Run ``prelude + body`` in the gateway venv; the dict ``result`` it ended with."""
    out = subprocess.run(
        [str(GATEWAY_PYTHON), "-c", prelude + body + "\nprint(json.dumps(result))"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])
