"""Errors that the CLI turns into one clear line for the user (no traceback)."""

from __future__ import annotations


class KernelfleetError(Exception):
    """Base of errors a user can act on; ``str()`` is the message to print."""


class ConfigError(KernelfleetError):
    """A configuration or spec file is wrong: which file, which field, why."""

    def __init__(self, file: str, field: str, reason: str) -> None:
        self.file, self.field, self.reason = file, field, reason
        where = f"{file}: {field}" if field else file
        super().__init__(f"{where}: {reason}")


class StartupError(KernelfleetError):
    """A component could not start (port in use, missing tool, crashed at start)."""
