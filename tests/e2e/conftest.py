"""One platform for the whole e2e run: started by `kernelfleet up`, stopped at the end."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from .stack import HubUser, Stack, start_stack, stop_stack_process, write_test_config


@pytest.fixture(scope="package")  # stopped when the e2e tests are done, not at session end
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp: Path = tmp_path_factory.mktemp("stack")
    running = start_stack(write_test_config(tmp))
    try:
        yield running
    finally:
        stop_stack_process(running.process)


@pytest.fixture
async def users(stack: Stack) -> AsyncIterator[dict[str, HubUser]]:
    """Logged-in browser sessions for every demo user (servers not yet started)."""
    sessions = {name: HubUser(stack, name) for name in stack.logins}
    for session in sessions.values():
        await session.login()
    try:
        yield sessions
    finally:
        for session in sessions.values():
            await session.close()
