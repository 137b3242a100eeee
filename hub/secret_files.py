"""Secrets kept as files under ``<state_dir>/secrets/`` (never on the command line or in logs)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from kernelfleet.errors import StartupError


def _read_secret(path: Path) -> str:
    try:
        value = path.read_text().strip()
    except OSError as e:
        raise StartupError(f"cannot read secret file {path}: {e.strerror}") from e
    if not value:
        raise StartupError(f"secret file {path} is empty; delete it to have a new one generated")
    return value


def read_or_create_secret(path: Path, *, nbytes: int = 32) -> str:
    """Return the secret stored in ``path``; create it (``nbytes`` random bytes, hex) if absent.

    A new file is created with mode 0600 in a folder created with mode 0700. An existing
    file is read as is: its writer (``kernelfleet up``) owns its permissions.
    """
    if path.exists():
        return _read_secret(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    value = secrets.token_hex(nbytes)
    try:
        # O_EXCL: if another process created it meanwhile, use theirs rather than overwrite it.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_secret(path)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value
