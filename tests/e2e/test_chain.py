"""The walking skeleton end to end: hub login → notebook server → EG → scheduler → kernel."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest
import websockets

from tests.support.kernel_ws import execute

from .stack import HubUser, Stack

pytestmark = pytest.mark.e2e


async def _run(user: HubUser, kernel_id: str, code: str) -> str:
    session = uuid.uuid4().hex
    async with user.channels(kernel_id) as ws:
        result = await execute(ws, code, session=session)
    assert result.status == "ok", result
    return result.stdout + (result.result or "")


async def _start(user: HubUser, kernelspec: str) -> str:
    response = await user.start_kernel(kernelspec)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def test_wrong_password_is_a_login_error(stack: Stack) -> None:
    alice = HubUser(stack, "alice")
    try:
        page = await alice.login(password="not-her-password")
        assert "Invalid username or password" in page.text
        assert not any(c.name.startswith("jupyterhub-session") for c in alice.http.cookies.jar)
        bob = HubUser(stack, "bob")
        page = await bob.login(password=stack.logins["alice"])
        assert "Invalid username or password" in page.text
        await bob.close()
    finally:
        await alice.close()


async def test_two_users_run_code_on_their_own_kernels(users: dict[str, HubUser]) -> None:
    alice, bob = users["alice"], users["bob"]
    await asyncio.gather(alice.start_server(), bob.start_server())
    kernels = await asyncio.gather(_start(alice, "python-cpu"), _start(bob, "python-cpu"))
    outputs = await asyncio.gather(
        _run(alice, kernels[0], "import os; print(os.environ['KERNEL_USERNAME'], 6*7)"),
        _run(bob, kernels[1], "import os; print(os.environ['KERNEL_USERNAME'], 6*7)"),
    )
    assert outputs[0].strip() == "alice 42"
    assert outputs[1].strip() == "bob 42"
    # each user's list of kernels holds only their own
    listed = (await alice.api("GET", "/kernels")).json()
    assert [k["id"] for k in listed] == [kernels[0]]
    for user, kernel_id in zip((alice, bob), kernels, strict=True):
        assert (await user.api("DELETE", f"/kernels/{kernel_id}")).status_code == 204


async def test_kernel_home_and_working_dir_belong_to_the_user(
    stack: Stack, users: dict[str, HubUser]
) -> None:
    alice = users["alice"]
    await alice.start_server()
    kernel_id = await _start(alice, "python-cpu")
    out = await _run(alice, kernel_id, "import os; print(os.environ['HOME']); print(os.getcwd())")
    home, cwd = out.split()
    assert home == cwd and home.endswith("/alice")
    await alice.api("DELETE", f"/kernels/{kernel_id}")


async def test_bob_cannot_touch_alices_kernel_through_eg(
    stack: Stack, users: dict[str, HubUser]
) -> None:
    alice, bob = users["alice"], users["bob"]
    await alice.start_server()
    kernel_id = await _start(alice, "python-cpu")
    headers = {"Authorization": f"token {await bob.hub_token()}"}
    async with httpx.AsyncClient(base_url=stack.gateway_url, headers=headers) as eg:
        listed = (await eg.get("/api/kernels")).json()
        assert kernel_id not in [k["id"] for k in listed]
        assert (await eg.get(f"/api/kernels/{kernel_id}")).status_code == 404
        assert (await eg.post(f"/api/kernels/{kernel_id}/interrupt")).status_code == 404
        assert (await eg.post(f"/api/kernels/{kernel_id}/restart")).status_code == 404
        assert (await eg.delete(f"/api/kernels/{kernel_id}")).status_code == 404
    ws_url = stack.gateway_url.replace("http", "ws") + f"/api/kernels/{kernel_id}/channels"
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(ws_url, additional_headers=headers):
            pass
    assert refused.value.response.status_code == 404
    # alice's kernel is untouched
    assert "42" in await _run(alice, kernel_id, "print(6*7)")
    await alice.api("DELETE", f"/kernels/{kernel_id}")


async def test_client_cannot_claim_another_identity_or_image(
    stack: Stack, users: dict[str, HubUser]
) -> None:
    bob = users["bob"]
    headers = {"Authorization": f"token {await bob.hub_token()}"}
    async with httpx.AsyncClient(base_url=stack.gateway_url, headers=headers, timeout=60) as eg:
        response = await eg.post(
            "/api/kernels",
            json={
                "name": "python-cpu",
                "env": {
                    "KERNEL_USERNAME": "alice",
                    "KERNEL_IMAGE": "evil/image:latest",
                    "KERNEL_UID": "0",
                },
            },
        )
        assert response.status_code == 201, response.text
        kernel_id = response.json()["id"]
        ws_url = stack.gateway_url.replace("http", "ws") + f"/api/kernels/{kernel_id}/channels"
        async with websockets.connect(ws_url, additional_headers=headers) as ws:
            result = await execute(
                ws,
                "import os; print(os.environ.get('KERNEL_USERNAME'), "
                "os.environ.get('KERNEL_IMAGE'), os.environ.get('KERNEL_UID'))",
                session=uuid.uuid4().hex,
            )
        assert result.stdout.strip() == "bob None None"
        assert (await eg.delete(f"/api/kernels/{kernel_id}")).status_code == 204


async def test_kernelspecs_follow_groups_and_gpu_gets_a_device(
    users: dict[str, HubUser],
) -> None:
    alice, carol = users["alice"], users["carol"]
    await asyncio.gather(alice.start_server(), carol.start_server())
    alice_specs = (await alice.api("GET", "/kernelspecs")).json()["kernelspecs"]
    assert set(alice_specs) == {"python-cpu", "python-cpu-large"}
    refused = await alice.start_kernel("python-gpu")
    assert refused.status_code == 403
    assert "python-gpu" in refused.json()["message"]

    await carol.shutdown_kernels()
    carol_specs = (await carol.api("GET", "/kernelspecs")).json()["kernelspecs"]
    assert "python-gpu" in carol_specs
    kernel_id = await _start(carol, "python-gpu")
    device = (
        await _run(carol, kernel_id, "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])")
    ).strip()
    assert device in {"0", "1"}
    await carol.api("DELETE", f"/kernels/{kernel_id}")


async def test_quota_refusal_reaches_the_notebook_server_and_shutdown_frees_it(
    stack: Stack, users: dict[str, HubUser]
) -> None:
    bob = users["bob"]
    await bob.start_server()
    await bob.shutdown_kernels()
    started = [await _start(bob, "python-cpu") for _ in range(3)]
    refused = await bob.start_kernel("python-cpu")
    assert refused.status_code == 403, refused.text
    assert refused.json()["message"] == (
        "You already have 3 of 3 kernels running. Shut one down from the Running panel."
    )
    assert (await bob.api("DELETE", f"/kernels/{started[0]}")).status_code == 204
    started[0] = await _start(bob, "python-cpu")
    for kernel_id in started:
        await bob.api("DELETE", f"/kernels/{kernel_id}")


async def test_gateway_without_a_token_is_401(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.gateway_url) as eg:
        for path in ("/api/kernels", "/api/kernelspecs"):
            response = await eg.get(path)
            assert response.status_code == 401
            assert "Traceback" not in response.text
        bad = await eg.get("/api/kernels", headers={"Authorization": "token not-a-token"})
        assert bad.status_code == 401


async def test_audit_names_who_ran_what_from_which_notebook(
    stack: Stack, users: dict[str, HubUser]
) -> None:
    alice = users["alice"]
    await alice.start_server()
    created = await alice.api("POST", "/sessions", json={
        "path": "reports/q3.ipynb", "type": "notebook", "name": "q3.ipynb",
        "kernel": {"name": "python-cpu"},
    })  # fmt: skip
    assert created.status_code == 201, created.text
    kernel_id = created.json()["kernel"]["id"]
    marker = uuid.uuid4().hex
    assert marker in await _run(alice, kernel_id, f"print('{marker}')")
    await alice.api("DELETE", f"/sessions/{created.json()['id']}")
    records = []
    for _ in range(50):  # the gateway writes its audit buffer in the background
        log = stack.state_dir / "audit" / "audit.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines() if marker in line]
        if records:
            break
        await asyncio.sleep(0.1)
    execute = [r for r in records if r["event"] == "execute"]
    assert len(execute) == 1, records
    assert execute[0]["user"] == "alice"
    assert execute[0]["kernel_id"] == kernel_id
    assert execute[0]["notebook_path"] == "reports/q3.ipynb"
