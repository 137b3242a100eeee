"""The ``file`` secrets provider: ``<state_dir>/secrets.yaml``, for the embedded default.

The file maps secret paths (the same paths a Vault would have) to key → value mappings::

    kv/data/teams/analysts/warehouse:
      username: analyst
      password: "..."

It is read again at every kernel start (edits apply without a restart) and refused unless
it is a regular file with mode 0600 (no access for group or others). Messages about it
never quote its content: a YAML error names the line only.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .secrets import SecretNotFound, SecretsUnavailable


class FileSecretsProvider:
    """Reads secrets from a YAML file of ``path: {key: value}`` (see module docstring)."""

    label = "the secrets file"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def check(self) -> None:
        """Raise SecretsUnavailable if the file exists but may not or cannot be used."""
        if self.path.exists():
            self._load()

    async def read(self, path: str) -> Mapping[str, Any]:
        """The key → value mapping stored under ``path``."""
        secrets = await asyncio.to_thread(self._load)
        if secrets is None:
            raise SecretNotFound(f"not found: there is no secrets file {self.path}")
        found = secrets.get(path)
        if found is None:
            raise SecretNotFound(f"not found in {self.path}")
        return found

    async def aclose(self) -> None:
        return None

    def _load(self) -> dict[str, Mapping[str, Any]] | None:
        """The parsed file (None if it does not exist); SecretsUnavailable if refused."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise SecretsUnavailable(f"cannot read {self.path}: {e.strerror}") from None
        mode = stat.S_IMODE(info.st_mode)
        if not stat.S_ISREG(info.st_mode):
            raise SecretsUnavailable(f"{self.path} is not a regular file")
        if mode & 0o077:
            raise SecretsUnavailable(
                f"{self.path} is refused: its mode is {mode:04o}, it must be 0600 "
                f"(chmod 600 {self.path})"
            )
        try:
            raw = yaml.safe_load(self.path.read_text()) or {}
        except OSError as e:
            raise SecretsUnavailable(f"cannot read {self.path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            # Never the exception's text: PyYAML quotes the offending line, i.e. a value.
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise SecretsUnavailable(f"{self.path} is not valid YAML{where}") from None
        return _validated(raw, self.path)


def _validated(raw: Any, file: Path) -> dict[str, Mapping[str, Any]]:
    if not isinstance(raw, dict):
        raise SecretsUnavailable(f"{file} must map secret paths to key: value mappings")
    for path, values in raw.items():
        if not isinstance(path, str) or not isinstance(values, dict):
            raise SecretsUnavailable(
                f"{file}: entry {str(path)[:80]!r} must map keys to values (path: {{key: value}})"
            )
    return raw
