"""gateway.client's per-kernel manager: kernel events as before, schemas read once.

jupyter-server's own ``GatewayKernelManager`` re-reads the ``kernel_actions`` schema file
for every kernel (~1.8 ms of the notebook server's CPU per start on the bench machine).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from jupyter_events import EventLogger
from jupyter_server.gateway.gateway_client import GatewayClient
from jupyter_server.gateway.managers import GatewayKernelManager, GatewayMappingKernelManager
from jupyter_server.serverapp import ServerApp
from traitlets.config import Config

from gateway.client.extension import link_extension
from gateway.client.managers import KernelfleetGatewayKernelManager

KERNEL_ACTIONS = "https://events.jupyter.org/jupyter_server/kernel_actions/v1"
OURS = "gateway.client.managers.KernelfleetGatewayKernelManager"


class Records(logging.Handler):
    """The events an event logger handed to its logging handlers, as dicts."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(json.loads(self.format(record)))


@pytest.fixture(autouse=True)
def _no_gateway_client_left() -> Iterator[None]:
    """The managers make GatewayClient's process-wide instance: none outlives a test."""
    yield
    GatewayClient.clear_instance()


@pytest.fixture
def server() -> Iterator[tuple[ServerApp, list[str], Records]]:
    """A ServerApp with an event logger that counts schema registrations and keeps events."""
    app = ServerApp()
    logger = EventLogger()
    registered: list[str] = []
    register = logger.register_event_schema

    def counting(schema: Any) -> None:
        registered.append(str(schema))
        register(schema)

    logger.register_event_schema = counting  # type: ignore[method-assign]
    records = Records()
    logger.register_handler(records)
    app.event_logger = logger
    yield app, registered, records


def managers(app: ServerApp, cls: type, count: int) -> list[GatewayKernelManager]:
    mapping = GatewayMappingKernelManager(parent=app, kernel_manager_class=f"{cls.__module__}."
                                          f"{cls.__qualname__}")  # fmt: skip
    return [mapping.kernel_manager_factory(parent=mapping) for _ in range(count)]


def test_stock_manager_reads_the_schema_for_every_kernel(server: Any) -> None:
    app, registered, _ = server
    for km in managers(app, GatewayKernelManager, 3):
        assert km.event_logger is app.event_logger
    assert len(registered) == 3  # what this module's class saves


def test_schema_is_registered_once_and_events_still_reach_the_server(server: Any) -> None:
    app, registered, records = server
    kms = managers(app, KernelfleetGatewayKernelManager, 3)
    for n, km in enumerate(kms):
        assert km.event_logger is app.event_logger
        km.emit(schema_id=KERNEL_ACTIONS,
                data={"action": "start", "kernel_id": f"k{n}", "status": "success",
                      "msg": f"Kernel k{n} was started."})  # fmt: skip
    assert len(registered) == 1
    assert [e["kernel_id"] for e in records.events] == ["k0", "k1", "k2"]
    assert {e["__schema__"] for e in records.events} == {KERNEL_ACTIONS}


def test_without_a_server_logger_each_manager_gets_a_working_one() -> None:
    mapping = GatewayMappingKernelManager(kernel_manager_class=OURS)
    first, second = (mapping.kernel_manager_factory(parent=mapping) for _ in range(2))
    assert first.event_logger is not second.event_logger
    for km in (first, second):  # each has the schema: emitting would raise without it
        km.emit(schema_id=KERNEL_ACTIONS, data={"action": "shutdown", "msg": "done"})


def test_extension_installs_it_unless_another_class_is_configured() -> None:
    app = ServerApp(config=Config({"GatewayClient": {"url": "http://127.0.0.1:1"}}))
    link_extension(app)
    assert app.config.GatewayMappingKernelManager.kernel_manager_class == OURS
    GatewayClient.clear_instance()  # link_extension installs the client: a fresh one next

    mine = "jupyter_server.gateway.managers.GatewayKernelManager"
    app = ServerApp(config=Config({
        "GatewayClient": {"url": "http://127.0.0.1:1"},
        "GatewayMappingKernelManager": {"kernel_manager_class": mine},
    }))  # fmt: skip
    link_extension(app)
    assert app.config.GatewayMappingKernelManager.kernel_manager_class == mine
