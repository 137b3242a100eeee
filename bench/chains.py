"""The four ways to reach a kernel that the bench compares, started on this machine.

==================  ==========================================================================
``raw``             jupyter_client's AsyncKernelClient on the kernel's ZMQ sockets, no server
``jupyter-server``  a plain jupyter-server 2 with a local kernel (stock, no extension)
``stock-eg``        a stock jupyter-server 2 gateway client -> stock Enterprise Gateway 3.3.0
                    (``jupyter-enterprisegateway``, LocalProcessProxy) -> kernel
``kernelfleet``     ``kernelfleet up``: hub proxy (CHP) -> notebook server + gateway.client ->
                    EG + gateway.server (hub identity, admission by the scheduler) -> kernel
==================  ==========================================================================

Every chain runs the same kernel (``.venv-kernel``'s ipykernel) and is reached over
loopback only. Baselines use the stock packages unmodified. :class:`Chains` starts each on
first use and stops all of them at the end.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import httpx
import websockets
import yaml
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from gateway.client.testing import (
    ServerProcess,
    start_enterprise_gateway,
    start_notebook_server,
    write_kernelspec,
)
from tests.e2e.stack import HubUser, Stack, start_stack, stop_stack_process, write_test_config

from .kernels import V1_PROTOCOL, Kernel, WebsocketKernel, ZmqKernel
from .runtime import progress

REPO = Path(__file__).resolve().parents[1]
EG_EXECUTABLE = REPO / ".venv-gateway" / "bin" / "jupyter-enterprisegateway"
KERNEL_PYTHON = REPO / ".venv-kernel" / "bin" / "python"
BENCH_KERNEL = "bench-python"
KERNELFLEET_KERNEL = "python-cpu"
LATENCY_USER = "alice"
STOCK_KERNEL_USER = "bench"
CHAIN_LABELS = {
    "raw": "raw ZMQ",
    "jupyter-server": "jupyter-server (local kernel)",
    "stock-eg": "stock EG 3.3.0 chain",
    "kernelfleet": "kernelfleet (hub proxy -> EG)",
}
GIB = 2**30


class Chain(Protocol):
    """A way to start, reach and stop kernels."""

    key: str

    async def start_kernel(self, *, timeout: float) -> tuple[float, Kernel]:
        """Start a kernel and open it; seconds from the request to its first
        kernel_info_reply, and the open connection."""
        ...

    async def stop_kernel(self, kernel: Kernel) -> None:
        """Close the connection and shut the kernel down."""
        ...


class ZmqChain:
    """Kernels started by jupyter_client in this process and talked to over ZMQ."""

    key = "raw"

    def __init__(self, kernel_dir: Path, runtime_dir: Path) -> None:
        self._specs = KernelSpecManager(kernel_dirs=[str(kernel_dir)], ensure_native_kernel=False)
        self._runtime_dir = runtime_dir
        runtime_dir.mkdir(parents=True, exist_ok=True)

    async def start_kernel(self, *, timeout: float) -> tuple[float, Kernel]:
        manager = AsyncKernelManager(
            kernel_name=BENCH_KERNEL,
            kernel_spec_manager=self._specs,
            connection_file=str(self._runtime_dir / f"kernel-{uuid.uuid4().hex}.json"),
        )
        began = time.perf_counter()
        await manager.start_kernel(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = manager.client()
        client.start_channels()
        await client.wait_for_ready(timeout=timeout)
        return time.perf_counter() - began, ZmqKernel(manager, client)

    async def stop_kernel(self, kernel: Kernel) -> None:
        assert isinstance(kernel, ZmqKernel)
        await kernel.close()
        await kernel.manager.shutdown_kernel(now=True)


class Endpoint(Protocol):
    """Where a websocket chain's REST API and channels websockets are."""

    async def post_kernel(self, name: str) -> httpx.Response: ...

    async def delete_kernel(self, kernel_id: str) -> None: ...

    def channels(self, kernel_id: str, *, timeout: float) -> Any: ...


class TokenEndpoint:
    """A notebook server reached directly with its login token."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.headers = {"Authorization": f"token {token}"}
        self.http = httpx.AsyncClient(base_url=url, headers=self.headers, timeout=60)

    async def post_kernel(self, name: str) -> httpx.Response:
        return await self.http.post("/api/kernels", json={"name": name})

    async def delete_kernel(self, kernel_id: str) -> None:
        await self.http.delete(f"/api/kernels/{kernel_id}")

    def channels(self, kernel_id: str, *, timeout: float) -> Any:
        url = (self.url.replace("http://", "ws://", 1)
               + f"/api/kernels/{kernel_id}/channels?session_id={uuid.uuid4().hex}")  # fmt: skip
        return websockets.connect(url, additional_headers=self.headers, max_size=None,
                                  open_timeout=timeout, subprotocols=[V1_PROTOCOL])  # fmt: skip


class HubEndpoint:
    """A user's notebook server reached through the hub's proxy with browser cookies."""

    def __init__(self, user: HubUser) -> None:
        self.user = user

    async def post_kernel(self, name: str) -> httpx.Response:
        return await self.user.start_kernel(name)

    async def delete_kernel(self, kernel_id: str) -> None:
        await self.user.api("DELETE", f"/kernels/{kernel_id}")

    def channels(self, kernel_id: str, *, timeout: float) -> Any:
        return self.user.channels(kernel_id, subprotocols=[V1_PROTOCOL], open_timeout=timeout)


class WebsocketChain:
    """Kernels started with ``POST /api/kernels`` and reached on their channels websocket."""

    def __init__(self, key: str, endpoint: Endpoint, kernel_name: str) -> None:
        self.key = key
        self.endpoint = endpoint
        self.kernel_name = kernel_name

    async def start_kernel(self, *, timeout: float) -> tuple[float, Kernel]:
        began = time.perf_counter()
        async with asyncio.timeout(timeout):
            response = await self.endpoint.post_kernel(self.kernel_name)
            if response.status_code != 201:
                raise RuntimeError(f"{self.key}: POST /api/kernels answered "
                                   f"{response.status_code}: {response.text[:300]}")  # fmt: skip
            kernel_id = str(response.json()["id"])
            try:
                kernel = await self._open(kernel_id, timeout=timeout)
            except BaseException:  # started but unreachable: do not leave it running
                await asyncio.shield(self._forget(kernel_id))
                raise
        return time.perf_counter() - began, kernel

    async def _open(self, kernel_id: str, *, timeout: float) -> WebsocketKernel:
        ws = await self.endpoint.channels(kernel_id, timeout=timeout)
        kernel = WebsocketKernel(ws, kernel_id)
        try:
            await kernel.kernel_info(timeout=timeout)
        except BaseException:
            await ws.close()
            raise
        return kernel

    async def _forget(self, kernel_id: str) -> None:
        try:
            await asyncio.wait_for(self.endpoint.delete_kernel(kernel_id), 30)
        except Exception as e:  # the server stops it at the end of the run anyway
            progress(f"{self.key}: deleting kernel {kernel_id} failed: {e!r}")

    async def stop_kernel(self, kernel: Kernel) -> None:
        await kernel.close()
        await self.endpoint.delete_kernel(kernel.kernel_id)


def bench_users(count: int) -> list[str]:
    """Names of the simulated users: u001, u002, ..."""
    return [f"u{i:03d}" for i in range(1, count + 1)]


def kernelfleet_overrides(users: int) -> dict[str, Any]:
    """kernelfleet.yaml changes for the bench: its simulated users, and a cpu pool that
    admits one python-cpu kernel each (plus the latency phase's) on this host."""
    raw = yaml.safe_load((REPO / "kernelfleet.yaml").read_text())
    pools = raw["pools"]
    need = users + 10
    cpus, memory = os.cpu_count() or 1, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    overcommit = max(float(pools["cpu"].get("overcommit", 1)), math.ceil(need / cpus),
                     math.ceil(need * 2 * GIB / memory))  # fmt: skip
    pools["cpu"]["overcommit"] = overcommit
    all_users = dict(raw.get("users") or {})
    all_users.update({name: {"groups": ["analysts"]} for name in bench_users(users)})
    return {"pools": pools, "users": all_users}


class Chains:
    """Starts each chain on first use (once per run) and stops them all in :meth:`aclose`."""

    def __init__(self, workdir: Path, *, users: int, deadline: Callable[[], float]) -> None:
        self.workdir = workdir
        self.users = users
        self._remaining = deadline
        self._exit = AsyncExitStack()
        self._chains: dict[str, Chain] = {}
        self._stack: Stack | None = None
        self._lock = asyncio.Lock()
        self._stack_lock = asyncio.Lock()
        self.kernel_dir = workdir / "jupyter"
        write_kernelspec(self.kernel_dir, BENCH_KERNEL, python=str(KERNEL_PYTHON))

    async def get(self, key: str) -> Chain:
        """The chain ``key`` (see the module docstring), started if it is not yet."""
        async with self._lock:
            if key not in self._chains:
                began = time.monotonic()
                progress(f"starting chain {key}")
                self._chains[key] = await self._start(key)
                progress(f"chain {key} ready in {time.monotonic() - began:.1f} s")
            return self._chains[key]

    async def _start(self, key: str) -> Chain:
        if key == "raw":
            return ZmqChain(self.kernel_dir / "kernels", self.workdir / "raw-runtime")
        if key == "jupyter-server":
            url, token = await self._notebook_server("plain", gateway_url="")
            return WebsocketChain(key, self._endpoint(url, token), BENCH_KERNEL)
        if key == "stock-eg":
            gateway = await self._server(
                start_enterprise_gateway,
                self.workdir / "stock-eg",
                executable=EG_EXECUTABLE,
                jupyter_path=self.kernel_dir,
            )
            url, token = await self._notebook_server("stock-nb", gateway_url=gateway.url)
            return WebsocketChain(key, self._endpoint(url, token), BENCH_KERNEL)
        if key == "kernelfleet":
            user = await self.hub_user(LATENCY_USER)
            return WebsocketChain(key, HubEndpoint(user), KERNELFLEET_KERNEL)
        raise KeyError(f"unknown chain {key!r}; known: {', '.join(CHAIN_LABELS)}")

    def _endpoint(self, url: str, token: str) -> TokenEndpoint:
        endpoint = TokenEndpoint(url, token)
        self._exit.push_async_callback(endpoint.http.aclose)
        return endpoint

    async def _server(self, start: Callable[..., ServerProcess], workdir: Path,
                      **kwargs: Any) -> ServerProcess:  # fmt: skip
        timeout = min(90.0, self._remaining())
        server = await asyncio.to_thread(start, workdir, timeout=timeout, **kwargs)
        self._exit.callback(server.stop)
        return server

    async def _notebook_server(self, name: str, *, gateway_url: str) -> tuple[str, str]:
        """A stock notebook server (no gateway.client); gateway_url "" means local kernels."""
        token, root = secrets.token_hex(16), self.workdir / name / "root"
        root.mkdir(parents=True, exist_ok=True)
        server = await self._server(start_notebook_server, self.workdir / name,
                                    gateway_url=gateway_url, token=token, root_dir=root,
                                    env={"JUPYTER_PATH": str(self.kernel_dir),
                                         # stock EG refuses kernels of "root" by default
                                         "KERNEL_USERNAME": STOCK_KERNEL_USER},
                                    use_extension=False)  # fmt: skip
        return server.url, token

    async def kernelfleet(self) -> Stack:
        """The platform (``kernelfleet up``) with the bench's simulated users."""
        async with self._stack_lock:
            if self._stack is None:
                self._stack = await self._start_stack()
        return self._stack

    async def _start_stack(self) -> Stack:
        folder = self.workdir / "kernelfleet"
        folder.mkdir(parents=True, exist_ok=True)
        config = write_test_config(folder, **kernelfleet_overrides(self.users))
        timeout = min(240.0, self._remaining())
        stack = await asyncio.to_thread(start_stack, config, timeout=timeout)
        self._exit.callback(stop_stack_process, stack.process)
        return stack

    async def hub_user(self, name: str) -> HubUser:
        """A logged-in browser session of ``name`` whose server is running."""
        stack = await self.kernelfleet()
        user = HubUser(stack, name)
        self._exit.push_async_callback(user.close)
        await user.login()
        await user.start_server()
        return user

    async def aclose(self) -> None:
        """Stop every chain started so far (last started first)."""
        await self._exit.aclose()


@asynccontextmanager
async def kernel_on(chain: Chain, *, timeout: float) -> AsyncIterator[tuple[float, Kernel]]:
    """A kernel started on ``chain`` for the block, stopped after it."""
    started, kernel = await chain.start_kernel(timeout=timeout)
    try:
        yield started, kernel
    finally:
        await asyncio.wait_for(chain.stop_kernel(kernel), 30)
