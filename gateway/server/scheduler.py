"""The gateway's side of the scheduler API: admissions before a start, releases after a stop.

Shapes are in docs/contracts.md. A refusal reaches the user verbatim: the scheduler's
``message`` becomes the gateway's JSON ``message`` with the scheduler's status code.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import httpx

from .errors import GatewayError

log = logging.getLogger("kernelfleet.gateway")

SCHEDULER_UNREACHABLE = (
    "The kernelfleet scheduler is unreachable; kernels cannot start right now. "
    "Try again in a minute."
)


class Scheduler(Protocol):
    """What the kernel manager needs from a scheduler."""

    async def admit(
        self, *, kernel_id: str, user: str, groups: list[str], kernelspec: str
    ) -> dict[str, str]:
        """Admit a kernel start; return the env the kernel must get, or raise GatewayError."""
        ...

    async def release(self, kernel_id: str) -> None:
        """Release a kernel's lease; never raises."""
        ...

    async def aclose(self) -> None:
        """Free connections."""
        ...


class NoScheduler:
    """Admits everything and releases nothing: for ``scheduler_url = ""`` (tests, demos)."""

    async def admit(
        self, *, kernel_id: str, user: str, groups: list[str], kernelspec: str
    ) -> dict[str, str]:
        return {}

    async def release(self, kernel_id: str) -> None:
        return None

    async def aclose(self) -> None:
        return None


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
        self._client = httpx.AsyncClient(
            timeout=timeout_s,
            transport=transport,
            headers={"Authorization": f"token {token}"},
        )

    async def admit(
        self, *, kernel_id: str, user: str, groups: list[str], kernelspec: str,
        admin: bool = False,
    ) -> dict[str, str]:
        """POST /v1/admissions; the admitted env, or a GatewayError carrying the refusal."""
        body = {"kernel_id": kernel_id, "user": user, "groups": groups, "kernelspec": kernelspec,
                "admin": admin}
        try:
            response = await self._client.post(f"{self.url}/v1/admissions", json=body)
        except httpx.HTTPError as e:
            raise _unreachable(f"POST /v1/admissions failed: {type(e).__name__}") from e
        answer = _json_or_none(response)
        if response.status_code in (200, 201) and answer and answer.get("decision") == "admitted":
            return _admitted_env(answer)
        raise _refusal(response.status_code, answer, kernel_id=kernel_id)

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
