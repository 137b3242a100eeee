"""The notebook server's per-kernel manager for gateway kernels, without a file read per kernel.

jupyter-server 2 gives every kernel its own ``GatewayKernelManager``, and each one, when it
first emits a kernel event (at the end of its start), registers the ``kernel_actions``
schema with the server's event logger again: it reads and parses the schema's YAML file,
then finds the schema already registered and drops it. That is ~1.8 ms of the notebook
server's CPU on every kernel start (warm or cold: bench/README.md) and again on every
shutdown's first event. `KernelfleetGatewayKernelManager` registers the schemas once per
event logger and reuses the logger after that; events reach the same logger and listeners.
"""

from __future__ import annotations

import weakref
from typing import Any

from jupyter_events import EventLogger
from jupyter_server.gateway.managers import GatewayKernelManager
from traitlets import default

#: The event loggers whose schemas are registered, with the schema paths registered in each.
_registered: weakref.WeakKeyDictionary[EventLogger, frozenset[str]] = weakref.WeakKeyDictionary()


class KernelfleetGatewayKernelManager(GatewayKernelManager):
    """`GatewayKernelManager` that registers its event schemas once per event logger."""

    @default("event_logger")
    def _default_event_logger(self) -> Any:
        shared = _server_event_logger(self)
        paths = frozenset(
            str(p) for p in self.core_event_schema_paths + self.extra_event_schema_paths
        )
        if shared is not None and paths <= _registered.get(shared, frozenset()):
            return shared
        logger = super()._default_event_logger()  # registers every schema it needs
        if shared is not None and logger is shared:
            _registered[shared] = _registered.get(shared, frozenset()) | paths
        return logger


def _server_event_logger(manager: GatewayKernelManager) -> EventLogger | None:
    """The server's event logger, as jupyter-server's own default looks it up (the mapping
    manager's parent's), or None (then every manager gets a logger of its own)."""
    parent = manager.parent
    owner = parent.parent if parent is not None else None
    logger = getattr(owner, "event_logger", None) if owner is not None else None
    return logger if isinstance(logger, EventLogger) else None
