"""JupyterLab in headless Chromium runs a cell through notebook server -> stock EG 3.3.0.

Self-contained (no hub): starts EG and a JupyterLab server with gateway.client itself.
The stock chain fails exactly here (DESIGN.md, Known pitfalls): Chromium aborts the first
kernel websocket handshake because the server answers without the subprotocol JupyterLab
offered, JupyterLab retries with the same session id, and EG's stale-connection handling
leaves the kernel "Unknown" with the cell stuck at [*]. A Python websocket client does
not trigger it, so only a real browser proves the fix.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from gateway.client.testing import (
    ServerProcess,
    start_enterprise_gateway,
    start_notebook_server,
    write_kernelspec,
)

if TYPE_CHECKING:
    from playwright.async_api import ConsoleMessage, Page

playwright_api = pytest.importorskip("playwright.async_api")

REPO = Path(__file__).resolve().parents[2]
EG_EXECUTABLE = REPO / ".venv-gateway" / "bin" / "jupyter-enterprisegateway"
CHROMIUM = Path("/usr/bin/chromium")
KERNEL = "kf-python"
CODE = "import os; print(os.getpid(), 6*7)"
ATTEMPTS = 3

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}"),
    pytest.mark.skipif(not EG_EXECUTABLE.exists(), reason=".venv-gateway not built"),
]


@dataclass
class Lab:
    """EG plus a JupyterLab server using it, and the token to log in with."""

    gateway: ServerProcess
    notebook: ServerProcess
    token: str

    def notebook_url(self, attempt: int) -> str:
        """A fresh workspace with notebook ``attempt`` open (a fresh kernel each time)."""
        path = f"/lab/workspaces/kf-attempt-{attempt}/tree/{notebook_name(attempt)}"
        return f"{self.notebook.url}{path}?token={self.token}"

    def logs(self) -> str:
        return (
            f"--- notebook server log ---\n{self.notebook.log_tail()}\n"
            f"--- gateway log ---\n{self.gateway.log_tail()}"
        )


def notebook_name(attempt: int) -> str:
    return f"attempt-{attempt}.ipynb"


def write_notebook(path: Path) -> None:
    """An empty notebook whose metadata names the gateway's kernelspec."""
    notebook = {
        "cells": [
            {"cell_type": "code", "execution_count": None, "id": "cell-1", "metadata": {},
             "outputs": [], "source": []}
        ],
        "metadata": {"kernelspec": {"name": KERNEL, "display_name": "Python (kernelfleet test)",
                                    "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }  # fmt: skip
    path.write_text(json.dumps(notebook))


@contextmanager
def started_lab(root: Path, *, gateway_args: Sequence[str] = ()) -> Iterator[Lab]:
    """Stock EG (token required) and JupyterLab with gateway.client, stopped on exit."""
    write_kernelspec(root / "jupyter", KERNEL, display_name="Python (kernelfleet test)")
    notebooks = root / "notebooks"
    notebooks.mkdir()
    for attempt in range(ATTEMPTS):
        write_notebook(notebooks / notebook_name(attempt))
    hub_token, token = secrets.token_hex(16), secrets.token_hex(16)
    gateway = start_enterprise_gateway(
        root / "eg",
        executable=EG_EXECUTABLE,
        jupyter_path=root / "jupyter",
        auth_token=hub_token,
        extra_args=gateway_args,
    )
    try:
        notebook = start_notebook_server(
            root / "nb",
            gateway_url=gateway.url,
            token=token,
            root_dir=notebooks,
            app="jupyterlab",
            env={"JUPYTERHUB_API_TOKEN": hub_token, "KERNEL_USERNAME": "kf-tester"},
        )
        try:
            yield Lab(gateway, notebook, token)
        finally:
            notebook.stop()
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with started_lab(tmp_path_factory.mktemp("browser-chain")) as running:
        yield running


@dataclass
class Browser:
    """A Chromium page and what its console said."""

    page: Page
    console: list[str] = field(default_factory=list)


@asynccontextmanager
async def chromium(lab: Lab, name: str) -> AsyncIterator[Browser]:
    """A fresh headless Chromium page; on a Playwright error, a screenshot and the logs."""
    async with playwright_api.async_playwright() as playwright:
        instance = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox"]
        )
        try:
            browser = Browser(await instance.new_page())

            def remember(entry: ConsoleMessage) -> None:
                browser.console.append(f"{entry.type}: {entry.text}")

            browser.page.on("console", remember)
            try:
                yield browser
            except playwright_api.Error as e:
                shot = Path(f"/tmp/kernelfleet-{name}.png")
                await browser.page.screenshot(path=str(shot))
                pytest.fail(
                    f"{e.message.splitlines()[0]}; screenshot {shot}\n--- browser console ---\n"
                    + "\n".join(browser.console)
                    + "\n"
                    + lab.logs()
                )
        finally:
            await instance.close()


async def run_cell(page: Page, url: str) -> str:
    """Open ``url``; once the kernel is idle, type CODE into the first cell and Shift+Enter.

    Waiting for "Idle" first matters: JupyterLab drops a Shift+Enter that comes before the
    session has a kernel, and "Idle" is exactly what the stock chain never reaches (its
    kernel stays "Unknown").
    """
    await page.goto(url)
    status = page.locator(".jp-StatusBar-TextItem", has_text="| Idle").first
    await status.wait_for(timeout=30_000)
    editor = page.locator(".jp-NotebookPanel .jp-Cell .cm-content").first
    await editor.click()
    await page.keyboard.type(CODE)
    await page.keyboard.press("Shift+Enter")
    output = page.locator(".jp-NotebookPanel .jp-OutputArea-output", has_text="42").first
    await output.wait_for(timeout=30_000)
    return await output.inner_text()


@pytest.mark.parametrize("attempt", range(ATTEMPTS))
async def test_jupyterlab_runs_a_cell_through_the_gateway(lab: Lab, attempt: int) -> None:
    async with chromium(lab, f"browser-chain-{attempt}") as browser:
        output = await run_cell(browser.page, lab.notebook_url(attempt))
    assert re.fullmatch(r"\d+ 42", output.strip()), output
    handshake_errors = [line for line in browser.console if "WebSocket handshake" in line]
    assert not handshake_errors


async def test_gateway_refusal_shows_verbatim_in_jupyterlab(tmp_path: Path) -> None:
    """EG refuses every kernel (max_kernels=0, message "Resource Limit"): JupyterLab's
    error dialog shows EG's words, not jupyter-server's "[%s] %s" template."""
    with started_lab(tmp_path, gateway_args=["--EnterpriseGatewayApp.max_kernels=0"]) as full:
        async with chromium(full, "browser-refusal") as browser:
            await browser.page.goto(full.notebook_url(0))
            dialog = browser.page.locator(".jp-Dialog").first
            await dialog.wait_for(timeout=30_000)
            text = await dialog.inner_text()
    assert "Error Starting Kernel" in text
    assert "Resource Limit" in text
    assert "%s" not in text and "Error from Gateway" not in text
