"""Keep secrets out of the notebook server's log (DESIGN.md: tokens never appear in logs).

jupyter-server 2.21's ``GatewayKernelManager.start_kernel`` logs its keyword arguments,
and for a session those include the server's whole environment: the hub API token (which
is also the gateway credential), ``JUPYTER_TOKEN`` and anything else secret. The filter
here replaces the values of such variables wherever they appear in a log message.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping

#: Environment variable names whose values are treated as secrets.
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_KEY|PRIVATE_KEY", re.I)
#: Shorter values are not redacted: they would mangle ordinary words in messages.
MIN_SECRET_LENGTH = 8
REPLACEMENT = "[secret]"


def secrets_in(environ: Mapping[str, str]) -> set[str]:
    """The values of ``environ``'s secret-looking variables worth redacting."""
    return {
        value
        for name, value in environ.items()
        if SECRET_NAME.search(name) and len(value) >= MIN_SECRET_LENGTH
    }


class SecretRedactingFilter(logging.Filter):
    """A logging filter that replaces known secret values in every record's message."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is replaced whole.
        ordered = sorted({s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite ``record`` in place when its message contains a secret; never drop it."""
        if self._pattern is None:
            return True
        message = record.getMessage()
        redacted = self._pattern.sub(REPLACEMENT, message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def install_redaction(logger: logging.Logger, secrets: Iterable[str]) -> SecretRedactingFilter:
    """Redact ``secrets`` from ``logger``'s records and from everything its handlers emit."""
    redactor = SecretRedactingFilter(secrets)
    logger.addFilter(redactor)
    for handler in logger.handlers:
        handler.addFilter(redactor)
    return redactor
