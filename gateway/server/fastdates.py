"""Fast ISO 8601 parsing for jupyter_client 6's message dates (EG's hot path).

EG 3.3 runs jupyter_client 6, whose ``Session.deserialize`` turns every date string in a
message header into a datetime with ``dateutil.parser.parse`` (~60 us each). EG deserializes
each kernel message at least once (jupyter_server 1.24's activity watcher, twice for
``status``), so a ``1+1`` round trip spent over 1 ms of gateway CPU parsing dates - about a
sixth of kernelfleet's overhead over raw ZMQ (bench/README.md). Python 3.11's
``datetime.fromisoformat`` parses the same strings (``...T...Z``, offsets, 1-6 fraction
digits) ~300x faster; anything it refuses still goes to dateutil, so results are unchanged.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

_INSTALLED_FLAG = "_kernelfleet_fast_dates"


def parse_iso8601(text: str, *, fallback: Any) -> datetime:
    """``text`` as a datetime via ``fromisoformat``; ``fallback(text)`` where that fails."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return fallback(text)  # type: ignore[no-any-return]


def install_fast_dates() -> bool:
    """Make ``jupyter_client.jsonutil`` parse dates with :func:`parse_iso8601`.

    Idempotent; returns False when this jupyter_client has no ``_dateutil_parse`` to
    replace (newer versions parse dates differently), in which case nothing changes.
    """
    from jupyter_client import jsonutil

    current = getattr(jsonutil, "_dateutil_parse", None)
    if current is None:
        return False
    if getattr(current, _INSTALLED_FLAG, False):
        return True

    def fast(text: str, *args: Any, **kwargs: Any) -> datetime:
        if args or kwargs:
            return current(text, *args, **kwargs)  # type: ignore[no-any-return]
        return parse_iso8601(text, fallback=current)

    setattr(fast, _INSTALLED_FLAG, True)
    jsonutil._dateutil_parse = fast  # type: ignore[attr-defined]
    return True
