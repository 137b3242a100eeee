"""Keep secret values out of audit records and log lines.

:class:`SecretValues` knows the values injected into running kernels (in the gateway's
memory only, dropped when the kernel stops). A :class:`Redactor` replaces each value found
in a text with ``[secret:NAME]``; :class:`RedactingFilter` does the same to every log record
passing through the handlers it is installed on (EG logs kernel envs at DEBUG level).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping


class Redactor:
    """Replaces known values in text; longest values first.

    ``values`` is a mapping name → value, or ``(name, value)`` pairs (one name may come
    with several values, e.g. two kernels' passwords).
    """

    def __init__(self, values: Mapping[str, str] | Iterable[tuple[str, str]]) -> None:
        items = values.items() if isinstance(values, Mapping) else values
        pairs = {(value, name) for name, value in items if value}
        self._pairs = sorted(pairs, key=lambda pair: (-len(pair[0]), pair[1]))

    def __bool__(self) -> bool:
        return bool(self._pairs)

    def redact(self, text: str) -> tuple[str, list[str]]:
        """``text`` with every value replaced, and the names of the values that were found."""
        found = []
        for value, name in self._pairs:
            if value in text:
                text = text.replace(value, f"[secret:{name}]")
                found.append(name)
        return text, found


class SecretValues:
    """The secret values of running kernels, by kernel id (thread-safe: logs come from threads)."""

    def __init__(self) -> None:
        self._by_kernel: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        self._all = Redactor({})

    def add(self, kernel_id: str, env: Mapping[str, str]) -> None:
        """Remember ``env`` (name → value) for ``kernel_id``."""
        if not env:
            return
        with self._lock:
            self._by_kernel[kernel_id] = dict(env)
            self._all = self._union()

    def discard(self, kernel_id: str) -> None:
        """Forget ``kernel_id``'s values (it stopped)."""
        with self._lock:
            if self._by_kernel.pop(kernel_id, None) is not None:
                self._all = self._union()

    def redactor_for(self, kernel_id: str) -> Redactor:
        """A redactor for one kernel's values."""
        with self._lock:
            return Redactor(self._by_kernel.get(kernel_id, {}))

    def redact(self, text: str) -> str:
        """``text`` without any running kernel's values."""
        return self._all.redact(text)[0] if self._all else text

    @property
    def active(self) -> bool:
        """Whether any running kernel has secret values."""
        return bool(self._all)

    def _union(self) -> Redactor:
        return Redactor([pair for env in self._by_kernel.values() for pair in env.items()])


class RedactingFilter(logging.Filter):
    """A handler filter that scrubs secret values from the message and traceback."""

    def __init__(self, values: SecretValues) -> None:
        super().__init__()
        self.values = values

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.values.active:
            return True
        try:
            message = record.getMessage()
        except Exception:
            return True  # a broken format string: logging reports it itself
        redacted = self.values.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = self.values.redact(text)
        return True


def install_redaction(values: SecretValues, loggers: Iterable[logging.Logger]) -> None:
    """Add a RedactingFilter to every handler of ``loggers`` (and of the root logger)."""
    seen: set[int] = set()
    for logger in [logging.getLogger(), *loggers]:
        for handler in logger.handlers:
            if id(handler) not in seen:
                seen.add(id(handler))
                handler.addFilter(RedactingFilter(values))
