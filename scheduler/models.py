"""JSON bodies of the scheduler's HTTP API (docs/contracts.md), as pydantic models.

They give the API its validation and its OpenAPI schema. Unknown request fields are
ignored, so a newer gateway can send more than this scheduler knows.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from .leases import Lease

KERNEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
KernelId = Annotated[
    str, Field(pattern=KERNEL_ID_PATTERN, description="EG's kernel id, usually a UUID")
]
Name = Annotated[str, Field(min_length=1, max_length=256)]
Seconds = Annotated[float, Field(ge=0, le=1e11, allow_inf_nan=False)]


class ErrorBody(BaseModel):
    """Every error the scheduler answers."""

    error: str = Field(description="machine-readable code, e.g. quota_exceeded")
    message: str = Field(description="what the user reads")


class AdmissionRequest(BaseModel):
    """``POST /v1/admissions``: may ``user`` start ``kernel_id`` from ``kernelspec``?"""

    kernel_id: KernelId
    user: Name
    groups: list[Name] = Field(default_factory=list, max_length=1000)
    kernelspec: Name
    admin: bool = Field(False, description="JupyterHub admin: may use every kernelspec")


class AdmissionResponse(BaseModel):
    """An admitted kernel: its lease and the env the kernel must get."""

    decision: Literal["admitted"] = "admitted"
    lease: Lease
    env: dict[str, str] = Field(
        description="CUDA_VISIBLE_DEVICES: the leased GPU devices, '' when none"
    )


class QueuedResponse(BaseModel):
    """A request waiting in a full pool's queue (``202``). Poll
    ``GET /v1/admissions/{kernel_id}`` to wait for the outcome."""

    decision: Literal["queued"] = "queued"
    kernel_id: str
    pool: str
    position: int = Field(description="1 = next in line")
    deadline: float = Field(description="unix seconds; it times out then")
    message: str = Field(description="where the request stands, for the user")


class WithdrawResponse(BaseModel):
    """``DELETE /v1/admissions/{kernel_id}``: what withdrawing did (idempotent)."""

    left_queue: bool
    released: bool


class ReleaseResponse(BaseModel):
    """``DELETE /v1/leases/{kernel_id}``: whether a lease was released (idempotent)."""

    released: bool


class LeasesResponse(BaseModel):
    """``GET /v1/leases``."""

    leases: list[Lease]


class Resources(BaseModel):
    """Amounts of a pool's resources (memory in bytes)."""

    cpus: int | float
    memory: int
    gpus: int


class PoolBody(BaseModel):
    """One pool: capacity (overcommit applied), use, leases by state, queue, price."""

    name: str
    capacity: Resources
    used: Resources
    kernels: int
    states: dict[str, int] = Field(description="live leases by state (starting, idle, busy)")
    queued: int = Field(description="requests waiting for room")
    simulated_gpus: bool
    cost_per_hour: float
    overcommit: float


class PoolsResponse(BaseModel):
    """``GET /v1/pools``."""

    pools: list[PoolBody]


class HealthResponse(BaseModel):
    """``GET /healthz`` when Redis answers."""

    status: Literal["ok"] = "ok"
    redis: Literal["ok"] = "ok"


class ActivityReportBody(BaseModel):
    """One kernel's activity as the gateway sees it now (a snapshot, not a delta)."""

    kernel_id: KernelId
    execution_state: str = Field(
        max_length=64, description="idle, busy, starting, restarting, dead (releases), ..."
    )
    last_activity: Seconds | None = Field(None, description="unix seconds")
    connections: int = Field(0, ge=0, le=1_000_000, description="open channels websockets")


class ActivityRequest(BaseModel):
    """``PUT /v1/activity``: a batch of kernel activity reports from the gateway."""

    kernels: list[ActivityReportBody] = Field(max_length=5000)


class ActivityResponse(BaseModel):
    """What a batch did."""

    updated: int = Field(description="leases whose activity was recorded")
    released: list[str] = Field(description="kernels reported dead whose leases this released")
    unknown: list[str] = Field(description="kernels without a lease")


class QueueEntryBody(BaseModel):
    """A waiting request."""

    kernel_id: str
    user: str
    kernelspec: str
    pool: str
    position: int = Field(description="1 = next in line")
    enqueued: float = Field(description="unix seconds")
    deadline: float = Field(description="unix seconds")


class QueueBody(BaseModel):
    """One pool's queue, next first."""

    pool: str
    length: int
    entries: list[QueueEntryBody]


class QueuesResponse(BaseModel):
    """``GET /v1/queues``."""

    queues: list[QueueBody]


class UserQueueEntry(QueueEntryBody):
    """One of a user's waiting requests, with a sentence saying where it stands."""

    message: str


class UserQueueResponse(BaseModel):
    """``GET /v1/users/{user}/queue``: the user's waiting requests (empty: none)."""

    user: str
    entries: list[UserQueueEntry]


class QuotaBody(BaseModel):
    """Effective limits (null: unlimited); memory in bytes."""

    kernels: int | None
    cpus: float | None
    memory: int | None
    gpus: int | None
    gpu_hours_per_day: float | None


class UsageBody(BaseModel):
    """What a user holds now, and GPU-hours used in the last 24 hours."""

    kernels: int
    cpus: int | float
    memory: int
    gpus: int
    gpu_hours: float


class UserUsageResponse(BaseModel):
    """``GET /v1/users/{user}/usage``: usage against the effective quota."""

    user: str
    groups: list[str] = Field(description="the groups the quota was resolved with")
    quota: QuotaBody
    used: UsageBody
    queued: int = Field(description="requests waiting for a pool")
