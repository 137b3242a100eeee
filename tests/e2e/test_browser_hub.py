"""A person's path through the whole platform in headless Chromium: log in to the hub as
carol, get JupyterLab, start python-gpu from the launcher, run a cell, see the GPU device
the scheduler assigned, and see an eviction warning under that cell."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from .stack import HubUser, Stack

playwright_api = pytest.importorskip("playwright.async_api")
CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}"),
]


NOTICE = "kernelfleet: this GPU kernel has been idle for 25 minutes (browser test)"


async def send_notice(stack: Stack, user: str, text: str) -> None:
    """What the eviction sweep does: find the user's kernel, ask the gateway to tell them."""
    ops = {"Authorization": f"token {stack.secret('scheduler_token')}"}
    async with httpx.AsyncClient(timeout=30) as http:
        leases = await http.get(f"{stack.scheduler_url}/v1/leases", params={"user": user},
                                headers=ops)  # fmt: skip
        (lease,) = leases.json()["leases"]
        answer = await http.post(
            f"{stack.gateway_url}/kernelfleet/kernels/{lease['kernel_id']}/notice",
            json={"text": text},
            headers={"Authorization": f"token {stack.secret('gateway_service_token')}"},
        )
        assert answer.json()["delivered"] >= 1


async def test_carol_runs_a_gpu_cell_from_the_launcher(stack: Stack) -> None:
    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox"]
        )
        page = await browser.new_page()
        console: list[str] = []
        page.on("console", lambda entry: console.append(f"{entry.type}: {entry.text}"))
        try:
            await page.goto(f"{stack.hub_url}/hub/login")
            await page.fill("input#username_input", "carol")
            await page.fill("input#password_input", stack.logins["carol"])
            await page.click("#login_submit")
            # the hub spawns carol's server and redirects to JupyterLab
            card = page.locator('.jp-LauncherCard[title="Python 3 (GPU)"]').first
            await card.wait_for(timeout=120_000)
            cards = await page.locator(".jp-LauncherCard").all_inner_texts()
            await card.click()
            idle = page.locator(".jp-StatusBar-TextItem", has_text="| Idle").first
            await idle.wait_for(timeout=60_000)
            editor = page.locator(".jp-NotebookPanel .jp-Cell .cm-content").first
            await editor.click()
            await page.keyboard.type(
                'import os; print("device", os.environ["CUDA_VISIBLE_DEVICES"])'
            )
            await page.keyboard.press("Shift+Enter")
            output = page.locator(
                ".jp-NotebookPanel .jp-OutputArea-output", has_text="device"
            ).first
            await output.wait_for(timeout=60_000)
            text = await output.inner_text()
            # the scheduler's eviction warning appears under the cell carol ran last
            await send_notice(stack, "carol", NOTICE)
            notice = page.locator(".jp-NotebookPanel .jp-OutputArea-output", has_text=NOTICE)
            await notice.first.wait_for(timeout=30_000)
        except playwright_api.Error as e:
            shot = Path("/tmp/kernelfleet-browser-hub.png")
            await page.screenshot(path=str(shot))
            pytest.fail(
                f"{e.message.splitlines()[0]}; screenshot {shot}\n"
                + "\n".join(console[-30:])
                + "\n--- gateway log ---\n"
                + stack.log("gateway")[-4000:]
            )
        finally:
            await browser.close()
            carol = HubUser(stack, "carol")
            await carol.login()
            await carol.start_server()
            await carol.shutdown_kernels()  # give the GPU back for the other tests
            await carol.close()
    assert re.fullmatch(r"device [01]", text.strip()), text
    # carol's launcher offers exactly the kernelspecs her group may use
    assert any("Python 3 (GPU)" in c for c in cards)
