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
    """One pool: capacity (overcommit applied), use, price."""

    name: str
    capacity: Resources
    used: Resources
    kernels: int
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
