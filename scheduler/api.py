"""The ``/v1`` routes of the scheduler's HTTP API (docs/scheduler.md has the whole picture).

Who may call what (see :mod:`scheduler.auth`): changes (admissions, withdrawals,
releases, activity) need the service token; reads of pools, leases and queues need an
admin; a user reads their own usage and queue position.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from . import messages, models
from .activity import Report
from .admission import Admission, Queued
from .auth import Caller
from .errors import BadRequest, UnknownLease
from .leases import Lease
from .queue import Entry
from .service import Scheduler
from .warm import WARM_USER

_ADMISSION_ERRORS = {
    202: {"model": models.QueuedResponse, "description": "waiting in the pool's queue"},
    403: {"model": models.ErrorBody, "description": "quota_exceeded, kernelspec_forbidden"},
    404: {"model": models.ErrorBody, "description": "unknown_kernelspec, unknown_admission"},
    409: {"model": models.ErrorBody, "description": "pool_full, lease_conflict, queue_timeout"},
    410: {"model": models.ErrorBody, "description": "queue_left: the request left the queue"},
}
_LEASE_ERRORS = {404: {"model": models.ErrorBody, "description": "unknown_lease"}}
_USER_ERRORS = {403: {"model": models.ErrorBody, "description": "another user's data"}}

WaitSeconds = Annotated[
    float,
    Query(ge=0, le=3600, allow_inf_nan=False,
          description="If the pool is full, wait in its queue up to this many seconds "
          "(capped by kernel_launch_timeout); 0 refuses at once with pool_full."),
]  # fmt: skip
PollSeconds = Annotated[
    float,
    Query(ge=0, le=3600, allow_inf_nan=False,
          description="While still queued, hold the answer up to this many seconds (at most "
          "25) for a change; each call also tells the scheduler the client still waits."),
]  # fmt: skip
Filter = Annotated[str | None, Query(max_length=256)]


async def caller(request: Request) -> Caller:
    """The authenticated caller (set by the auth middleware). Async: FastAPI runs a plain
    function dependency in its thread pool, a thread hand-off on every request."""
    return request.state.caller  # type: ignore[no-any-return]


CallerDep = Annotated[Caller, Depends(caller)]


def _decision(decision: Admission | Queued, *, status: int) -> JSONResponse:
    if isinstance(decision, Queued):
        body = models.QueuedResponse(
            kernel_id=decision.kernel_id, pool=decision.pool, position=decision.position,
            deadline=decision.deadline,
            message=messages.queued(pool=decision.pool, position=decision.position),
        )  # fmt: skip
        return JSONResponse(body.model_dump(), status_code=202)
    admitted = models.AdmissionResponse(lease=decision.lease, env=decision.env)
    return JSONResponse(admitted.model_dump(), status_code=status)


def _entry_body(entry: Entry) -> dict[str, object]:
    return {
        "kernel_id": entry.kernel_id, "user": entry.user, "kernelspec": entry.kernelspec,
        "pool": entry.pool, "position": entry.position, "enqueued": entry.enqueued,
        "deadline": entry.deadline,
    }  # fmt: skip


def v1_router(scheduler: Scheduler) -> APIRouter:
    """The authenticated API."""
    router = APIRouter(prefix="/v1")

    @router.post("/admissions", status_code=201, response_model=models.AdmissionResponse,
                 responses=_ADMISSION_ERRORS)  # fmt: skip
    async def admit(
        body: models.AdmissionRequest, who: CallerDep, wait_s: WaitSeconds = 0.0
    ) -> JSONResponse:
        """Admit a kernel (atomically: quota, pool capacity, GPU devices), queue it, or refuse.

        Admitting the same kernel_id again returns the same lease or queue place. With
        ``wait_s`` a request for a full pool gets ``202`` and a place in the pool's fair queue.
        """
        who.require_service("admit kernels")
        if body.user == WARM_USER:
            raise BadRequest(
                f"{WARM_USER!r} is the warm pools' owner, not a user; warm "
                "kernels are admitted with POST /v1/warm-pools/{kernelspec}/kernels."
            )
        decision = await scheduler.admit(
            kernel_id=body.kernel_id, user=body.user, groups=body.groups,
            kernelspec=body.kernelspec, admin=body.admin, wait_s=wait_s,
        )  # fmt: skip
        return _decision(decision, status=201)

    @router.get("/admissions/{kernel_id}", response_model=models.AdmissionResponse,
                responses=_ADMISSION_ERRORS)  # fmt: skip
    async def admission(
        kernel_id: models.KernelId, who: CallerDep, wait_s: PollSeconds = 0.0
    ) -> JSONResponse:
        """Where an admission stands: ``200`` admitted, ``202`` still queued, or why not."""
        who.require_admin()
        return _decision(await scheduler.admission(kernel_id, wait_s=wait_s), status=200)

    @router.delete("/admissions/{kernel_id}", response_model=models.WithdrawResponse)
    async def withdraw(kernel_id: models.KernelId, who: CallerDep) -> models.WithdrawResponse:
        """The client gave up: leave the queue, and release a lease granted meanwhile."""
        who.require_service("withdraw admissions")
        left, released = await scheduler.withdraw(kernel_id)
        return models.WithdrawResponse(left_queue=left, released=released)

    @router.delete("/leases/{kernel_id}", response_model=models.ReleaseResponse)
    async def release(kernel_id: models.KernelId, who: CallerDep) -> models.ReleaseResponse:
        """Release a kernel's lease and what it holds; ``released: false`` if none."""
        who.require_service("release leases")
        return models.ReleaseResponse(released=await scheduler.release(kernel_id))

    @router.get("/leases", response_model=models.LeasesResponse)
    async def list_leases(
        who: CallerDep,
        user: Filter = None,
        pool: Filter = None,
        kernelspec: Filter = None,
        state: Literal["starting", "idle", "busy", "stopped"] | None = None,
    ) -> models.LeasesResponse:
        """Leases, oldest first, filtered by user, pool, kernelspec and state (``stopped``:
        those released in the last hour)."""
        who.require_admin()
        found = await scheduler.leases.list(
            user=user, pool=pool, kernelspec=kernelspec, state=state
        )
        return models.LeasesResponse(leases=found)

    @router.get("/leases/{kernel_id}", response_model=Lease, responses=_LEASE_ERRORS)
    async def get_lease(kernel_id: models.KernelId, who: CallerDep) -> Lease:
        """One live lease."""
        who.require_admin()
        lease = await scheduler.leases.get(kernel_id)
        if lease is None:
            raise UnknownLease(f"No live lease for kernel {kernel_id}.")
        return lease

    @router.put("/activity", response_model=models.ActivityResponse)
    async def activity(body: models.ActivityRequest, who: CallerDep) -> models.ActivityResponse:
        """Apply a batch of the gateway's kernel activity reports (idempotent snapshots).

        Moves leases between starting, idle and busy; a ``dead`` kernel's lease is released.
        """
        who.require_service("report activity")
        reports = [
            Report(kernel_id=r.kernel_id, execution_state=r.execution_state,
                   last_activity=r.last_activity, connections=r.connections)
            for r in body.kernels
        ]  # fmt: skip
        applied, released = await scheduler.report_activity(reports)
        return models.ActivityResponse(
            updated=len(applied.updated), released=released, unknown=applied.unknown
        )

    @router.get("/pools", response_model=models.PoolsResponse)
    async def pools(who: CallerDep) -> models.PoolsResponse:
        """Every pool: capacity (overcommit applied), use, leases by state, queue, cost."""
        who.require_admin()
        statuses = await scheduler.pool_status()
        return models.PoolsResponse.model_validate({"pools": [s.as_json() for s in statuses]})

    @router.get("/queues", response_model=models.QueuesResponse)
    async def queues(who: CallerDep) -> models.QueuesResponse:
        """Every pool's queue, next first."""
        who.require_admin()
        result = []
        for pool in scheduler.pools:
            entries = await scheduler.queue.waiting(pool)
            result.append({"pool": pool, "length": len(entries),
                           "entries": [_entry_body(e) for e in entries]})  # fmt: skip
        return models.QueuesResponse.model_validate({"queues": result})

    @router.get("/users/{user}/queue", response_model=models.UserQueueResponse,
                responses=_USER_ERRORS)  # fmt: skip
    async def user_queue(user: models.Name, who: CallerDep) -> models.UserQueueResponse:
        """A user's waiting requests and their positions (users: only their own)."""
        who.require_self_or_admin(user)
        entries = [
            {**_entry_body(e), "message": messages.queued(pool=e.pool, position=e.position)}
            for e in await scheduler.queue.of_user(user)
        ]
        return models.UserQueueResponse.model_validate({"user": user, "entries": entries})

    @router.get("/users/{user}/usage", response_model=models.UserUsageResponse,
                responses=_USER_ERRORS)  # fmt: skip
    async def user_usage(
        user: models.Name,
        who: CallerDep,
        groups: Annotated[list[str] | None, Query(max_length=100)] = None,
    ) -> models.UserUsageResponse:
        """A user's usage against their effective quota (users: only their own).

        The quota follows the user's groups: for a user asking themselves, those the hub
        says; for admins, ``groups`` if given, else those of the user's last admission.
        """
        who.require_self_or_admin(user)
        if not who.admin:
            groups = list(who.groups)
        usage = await scheduler.usage.of_user(user, groups=groups)
        return models.UserUsageResponse.model_validate({
            "user": user, "groups": usage.groups, "quota": usage.quota.model_dump(),
            "used": {"kernels": usage.kernels, "cpus": usage.cpus, "memory": usage.memory,
                     "gpus": usage.gpus, "gpu_hours": usage.gpu_hours},
            "queued": usage.queued,
        })  # fmt: skip

    return router
