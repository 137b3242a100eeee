"""The gateway's side of the scheduler API: admissions before a start, releases after a stop.

Shapes are in docs/contracts.md and docs/scheduler.md. A refusal reaches the user verbatim:
the scheduler's ``message`` becomes the gateway's JSON ``message`` with the scheduler's
status code. When a pool is full the admission waits in the pool's queue (``202``), polling
``GET /v1/admissions/{id}`` until it is admitted, refused or timed out; a scheduler restart
meanwhile is ridden out (the place is kept in Redis). A start whose client gave up (or was
cancelled) withdraws its request, so it leaves the queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from .errors import GatewayError

log = logging.getLogger("kernelfleet.gateway")

SCHEDULER_UNREACHABLE = (
    "The kernelfleet scheduler is unreachable; kernels cannot start right now. "
    "Try again in a minute."
)
QUEUE_GAVE_UP = "The kernel waited for room in its pool too long. Try again later."
CLIENT_GONE = "The kernel start was abandoned by its client while waiting for room."
QUEUE_POLL_S = 10.0  # how long the scheduler may hold one poll while the request waits
CLIENT_CHECK_S = 1.0  # poll slices when the client's connection is watched
RETRY_S = 0.5  # pause before asking again when the scheduler did not answer
QUEUE_GRACE_S = 5.0  # past the wait: the scheduler's own time-out answer says where it stood

ClientGone = Callable[[], bool]


@dataclass(frozen=True)
class StartFailure:
    """Why a kernel's pod did not start: ``reason`` (image_pull_failed, container_config,
    pending_timeout, start_timeout) and ``message``, written for the user."""

    reason: str
    message: str


class Scheduler(Protocol):
    """What the kernel manager needs from a scheduler."""

    async def admit(
        self, *, kernel_id: str, user: str, groups: list[str], kernelspec: str,
        admin: bool = False, wait_s: float = 0.0, client_gone: ClientGone | None = None,
    ) -> dict[str, str]:  # fmt: skip
        """Admit a kernel start (waiting up to ``wait_s`` for room in a full pool); return
        the env the kernel must get, or raise GatewayError."""
        ...

    async def release(self, kernel_id: str) -> None:
        """Release a kernel's lease; never raises."""
        ...

    async def warm_targets(self) -> dict[str, int] | None:
        """Warm-pool targets by (scheduler) kernelspec name; None: use the kernelspecs' own
        ``warm_target``. Raises GatewayError when the scheduler cannot say."""
        ...

    async def admit_warm(self, *, kernel_id: str, kernelspec: str) -> dict[str, str]:
        """Admit a warm kernel (pool capacity, no user); its env, or GatewayError."""
        ...

    async def claim_warm(
        self, *, kernel_id: str, user: str, groups: list[str], kernelspec: str, admin: bool
    ) -> dict[str, str]:
        """Give the warm ``kernel_id`` to ``user``: the env, or GatewayError (``warm_taken``
        / ``unknown_lease``: claim another; a quota refusal: refuse the start)."""
        ...

    async def report_activity(self, reports: list[dict[str, object]]) -> bool:
        """Send a batch of kernel activity reports; whether it was accepted. Never raises."""
        ...

    async def start_failure(self, kernel_id: str) -> StartFailure | None:
        """Why ``kernel_id``'s pod did not start, as the scheduler recorded it (Kubernetes
        backend), or None (nothing recorded, another backend, no answer). Never raises."""
        ...

    async def aclose(self) -> None:
        """Free connections."""
        ...


class NoScheduler:
    """Admits everything and releases nothing: for ``scheduler_url = ""`` (tests, demos)."""

    async def admit(
        self, *, kernel_id: str, user: str, groups: list[str], kernelspec: str,
        admin: bool = False, wait_s: float = 0.0, client_gone: ClientGone | None = None,
    ) -> dict[str, str]:  # fmt: skip
        return {}

    async def release(self, kernel_id: str) -> None:
        return None

    async def warm_targets(self) -> dict[str, int] | None:
        return None

    async def admit_warm(self, *, kernel_id: str, kernelspec: str) -> dict[str, str]:
        return {}

    async def claim_warm(
        self, *, kernel_id: str, user: str, groups: list[str], kernelspec: str, admin: bool
    ) -> dict[str, str]:
        return {}

    async def report_activity(self, reports: list[dict[str, object]]) -> bool:
        return True

    async def start_failure(self, kernel_id: str) -> StartFailure | None:
        return None

    async def aclose(self) -> None:
        return None


KEEPALIVE_EXPIRY_S = 15.0


class SchedulerClient:
    """Talks to the scheduler at ``url`` with its service ``token`` (``Authorization: token``)."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._timeout_s = timeout_s
        self._activity_failing = False
        self._client = httpx.AsyncClient(
            timeout=timeout_s,
            transport=transport,
            headers={"Authorization": f"token {token}"},
            # Drop idle connections well before the scheduler does (uvicorn's 5 s is raised
            # to 30 s there): reusing one the server is closing fails with a ReadError. A
            # kept connection saves a warm claim its TCP and HTTP set-up.
            limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S),
        )

    async def admit(
        self, *, kernel_id: str, user: str, groups: list[str], kernelspec: str,
        admin: bool = False, wait_s: float = 0.0, client_gone: ClientGone | None = None,
    ) -> dict[str, str]:  # fmt: skip
        """POST /v1/admissions; the admitted env, or a GatewayError carrying the refusal.

        With ``wait_s`` > 0 a full pool queues the request and this waits (bounded by
        ``wait_s``) until it is admitted or refused; ``client_gone`` is asked while waiting
        and, when it says so, the request is withdrawn.
        """
        body = {
            "kernel_id": kernel_id,
            "user": user,
            "groups": groups,
            "kernelspec": kernelspec,
            "admin": admin,
        }
        params = {"wait_s": wait_s} if wait_s > 0 else None
        try:
            response = await self._client.post(
                f"{self.url}/v1/admissions", json=body, params=params
            )
        except httpx.HTTPError as e:
            raise _unreachable(f"POST /v1/admissions failed: {type(e).__name__}") from e
        answer = _json_or_none(response)
        if response.status_code in (200, 201) and answer and answer.get("decision") == "admitted":
            return _admitted_env(answer)
        if response.status_code == 202 and answer and answer.get("decision") == "queued":
            log.info("Kernel %s of %s waits for pool %s (position %s)", kernel_id, user,
                     answer.get("pool"), answer.get("position"))  # fmt: skip
            return await self._wait_in_queue(kernel_id, wait_s, client_gone)
        raise _refusal(response.status_code, answer, kernel_id=kernel_id)

    async def _wait_in_queue(
        self, kernel_id: str, wait_s: float, client_gone: ClientGone | None
    ) -> dict[str, str]:
        """Poll the queued admission until an outcome; withdraw it if this gives up."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + wait_s + QUEUE_GRACE_S
        slice_s = CLIENT_CHECK_S if client_gone is not None else QUEUE_POLL_S
        try:
            while True:
                if client_gone is not None and client_gone():
                    raise GatewayError(503, CLIENT_GONE, code="client_gone")
                remaining = give_up - loop.time()
                if remaining <= 0:
                    raise GatewayError(409, QUEUE_GAVE_UP, code="queue_timeout")
                answer = await self._poll_admission(kernel_id, min(slice_s, remaining))
                if answer is not None:
                    return answer
        except (GatewayError, asyncio.CancelledError):
            await asyncio.shield(self.withdraw(kernel_id))
            raise

    async def _poll_admission(self, kernel_id: str, wait_s: float) -> dict[str, str] | None:
        """One long poll: the env once admitted, None while waiting (or the scheduler is
        momentarily away), GatewayError when refused."""
        try:
            response = await self._client.get(
                f"{self.url}/v1/admissions/{kernel_id}", params={"wait_s": round(wait_s, 3)},
                timeout=wait_s + self._timeout_s,
            )  # fmt: skip
        except httpx.HTTPError as e:
            log.info("Waiting admission of %s: scheduler unreachable (%s), asking again",
                     kernel_id, type(e).__name__)  # fmt: skip
            await asyncio.sleep(RETRY_S)
            return None
        answer = _json_or_none(response)
        if response.status_code in (200, 201) and answer and answer.get("decision") == "admitted":
            return _admitted_env(answer)
        if response.status_code == 202 or response.status_code >= 500:
            if response.status_code >= 500:
                await asyncio.sleep(RETRY_S)
            return None
        raise _refusal(response.status_code, answer, kernel_id=kernel_id)

    async def withdraw(self, kernel_id: str) -> None:
        """DELETE /v1/admissions/{kernel_id}: leave the queue (and drop a lease granted
        meanwhile). Never raises: a request that is never polled again times out anyway."""
        try:
            await self._client.delete(f"{self.url}/v1/admissions/{kernel_id}")
        except httpx.HTTPError as e:
            log.warning("Withdrawing the admission of %s failed: %s", kernel_id,
                        type(e).__name__)  # fmt: skip
        else:
            log.info("Withdrew the admission of kernel %s", kernel_id)

    async def report_activity(self, reports: list[dict[str, object]]) -> bool:
        """PUT /v1/activity with a batch of reports; whether the scheduler accepted it."""
        try:
            response = await self._client.put(f"{self.url}/v1/activity", json={"kernels": reports})
            accepted = response.status_code == 200
            why = f"HTTP {response.status_code}"
        except httpx.HTTPError as e:
            accepted, why = False, type(e).__name__
        if not accepted and not self._activity_failing:
            log.warning("Kernel activity reports are not reaching the scheduler (%s); "
                        "retrying quietly", why)  # fmt: skip
        elif accepted and self._activity_failing:
            log.info("Kernel activity reports reach the scheduler again")
        self._activity_failing = not accepted
        return accepted

    async def release(self, kernel_id: str) -> None:
        """DELETE /v1/leases/{kernel_id}; failures are logged (the scheduler reconciles)."""
        try:
            response = await self._client.delete(f"{self.url}/v1/leases/{kernel_id}")
        except httpx.HTTPError as e:
            log.warning("Releasing the lease of kernel %s failed: %s", kernel_id, type(e).__name__)
            return
        if response.status_code >= 400:
            log.warning(
                "Releasing the lease of kernel %s: scheduler answered %s",
                kernel_id,
                response.status_code,
            )
        else:
            log.info("Released the lease of kernel %s", kernel_id)

    async def warm_targets(self) -> dict[str, int] | None:
        """GET /v1/warm-pools: each kernelspec's current target."""
        try:
            response = await self._client.get(f"{self.url}/v1/warm-pools")
        except httpx.HTTPError as e:
            raise _unreachable(f"GET /v1/warm-pools failed: {type(e).__name__}") from e
        answer = _json_or_none(response)
        pools = answer.get("warm_pools") if answer and response.status_code == 200 else None
        if not isinstance(pools, list):
            raise _unreachable(f"GET /v1/warm-pools answered {response.status_code}")
        return {str(p["kernelspec"]): int(p["target"]) for p in pools
                if isinstance(p, dict) and "kernelspec" in p and "target" in p}  # fmt: skip

    async def admit_warm(self, *, kernel_id: str, kernelspec: str) -> dict[str, str]:
        """POST /v1/warm-pools/{kernelspec}/kernels."""
        path = f"/v1/warm-pools/{quote(kernelspec, safe='')}/kernels"
        return await self._admitted(path, {"kernel_id": kernel_id}, kernel_id=kernel_id)

    async def claim_warm(
        self, *, kernel_id: str, user: str, groups: list[str], kernelspec: str, admin: bool
    ) -> dict[str, str]:
        """POST /v1/warm-pools/{kernelspec}/claims."""
        path = f"/v1/warm-pools/{quote(kernelspec, safe='')}/claims"
        body = {"kernel_id": kernel_id, "user": user, "groups": groups, "admin": admin}
        return await self._admitted(path, body, kernel_id=kernel_id)

    async def _admitted(self, path: str, body: dict[str, Any], *, kernel_id: str
                        ) -> dict[str, str]:  # fmt: skip
        try:
            response = await self._client.post(f"{self.url}{path}", json=body)
        except httpx.HTTPError as e:
            raise _unreachable(f"POST {path} failed: {type(e).__name__}") from e
        answer = _json_or_none(response)
        if response.status_code in (200, 201) and answer and "lease" in answer:
            return _admitted_env(answer)
        raise _refusal(response.status_code, answer, kernel_id=kernel_id)

    async def start_failure(self, kernel_id: str) -> StartFailure | None:
        """GET /v1/start-failures/{kernel_id} (404 when nothing is recorded, or when the
        scheduler has no Kubernetes backend)."""
        path = f"/v1/start-failures/{quote(kernel_id, safe='')}"
        try:
            response = await self._client.get(f"{self.url}{path}")
        except httpx.HTTPError as e:
            log.warning("GET %s failed: %s", path, type(e).__name__)
            return None
        answer = _json_or_none(response)
        if response.status_code != 200 or not answer:
            return None
        reason, message = answer.get("reason"), answer.get("message")
        if not isinstance(reason, str) or not isinstance(message, str) or not message:
            return None
        return StartFailure(reason=reason, message=message)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


def _json_or_none(response: httpx.Response) -> dict[str, Any] | None:
    try:
        answer = response.json()
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def _admitted_env(answer: dict[str, Any]) -> dict[str, str]:
    env = answer.get("env") or {}
    if not isinstance(env, dict):
        raise _unreachable("admission answered a non-object env")
    return {str(k): str(v) for k, v in env.items()}


def _unreachable(log_message: str) -> GatewayError:
    return GatewayError(
        503, SCHEDULER_UNREACHABLE, code="scheduler_unreachable", log_message=log_message
    )


def _refusal(status: int, answer: dict[str, Any] | None, *, kernel_id: str) -> GatewayError:
    """The error to answer the client with when the scheduler did not admit."""
    message = answer.get("message") if answer else None
    code = answer.get("error") if answer else None
    if status == 401:
        # Our token, not the user's: a 401 would make the notebook server think its token is bad.
        return _unreachable("the scheduler refused the gateway's service token (401)")
    if not isinstance(message, str) or not message or status < 400:
        return _unreachable(f"admission of {kernel_id} answered {status} without an error message")
    log_message = f"admission of {kernel_id} refused ({status} {code}): {message}"
    return GatewayError(status, message, code=str(code or ""), log_message=log_message)
