"""``/v1/warm-pools``: warm-pool targets, warm admissions and claims (see :mod:`scheduler.warm`).

- ``GET /v1/warm-pools`` (admins): each kernelspec's target, where it comes from, and how
  many warm kernels it has (``ready``);
- ``PUT`` / ``DELETE /v1/warm-pools/{kernelspec}`` (service): pin a target, or go back to the
  spec's;
- ``POST /v1/warm-pools/{kernelspec}/kernels`` (service): EG admits a new warm kernel;
- ``POST /v1/warm-pools/{kernelspec}/claims`` (service): a user's start claims a warm one.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from . import models
from .admission import Admission, Queued
from .api import caller
from .auth import Caller
from .service import Scheduler
from .warm import WARM_USER, WarmClaims, WarmTargets

CallerDep = Annotated[Caller, Depends(caller)]


class WarmTargetRequest(BaseModel):
    """``PUT /v1/warm-pools/{kernelspec}`` body."""

    target: int = Field(ge=0, description="warm kernels to keep ready")


class WarmKernelRequest(BaseModel):
    """``POST /v1/warm-pools/{kernelspec}/kernels`` body: the warm kernel EG is starting."""

    kernel_id: models.KernelId


class ClaimRequest(BaseModel):
    """``POST /v1/warm-pools/{kernelspec}/claims`` body: who claims which warm kernel."""

    kernel_id: models.KernelId
    user: models.Name
    groups: list[models.Name] = Field(default_factory=list, max_length=1000)
    admin: bool = False


def _admitted(decision: Admission | Queued) -> models.AdmissionResponse:
    assert isinstance(decision, Admission)  # warm admissions never queue
    return models.AdmissionResponse(lease=decision.lease, env=decision.env)


def warm_router(scheduler: Scheduler) -> APIRouter:
    """The routes of the module docstring."""
    router = APIRouter(prefix="/v1", tags=["warm pools"])
    targets = WarmTargets.of(scheduler)
    claims = WarmClaims(scheduler.redis, admitter=scheduler.admitter, pools=scheduler.pools,
                        location=scheduler.location, clock=scheduler.clock)  # fmt: skip

    @router.get("/warm-pools")
    async def list_targets(who: CallerDep) -> dict[str, list[dict[str, object]]]:
        """Every kernelspec's warm target, its source (spec, manual) and its pool's limit."""
        who.require_admin()
        return {"warm_pools": [asdict(t) for t in await targets.all()]}

    @router.put("/warm-pools/{kernelspec}")
    async def set_target(
        kernelspec: str, body: WarmTargetRequest, who: CallerDep
    ) -> dict[str, object]:
        """Pin a kernelspec's warm target (persisted; every replica follows)."""
        who.require_service("set warm-pool targets")
        return asdict(await targets.set(kernelspec, body.target))

    @router.delete("/warm-pools/{kernelspec}")
    async def reset_target(kernelspec: str, who: CallerDep) -> dict[str, object]:
        """Back to spec.yaml's ``warm_target``."""
        who.require_service("set warm-pool targets")
        return asdict(await targets.reset(kernelspec))

    @router.post("/warm-pools/{kernelspec}/kernels", status_code=201,
                 response_model=models.AdmissionResponse)  # fmt: skip
    async def admit_warm(
        kernelspec: str, body: WarmKernelRequest, who: CallerDep
    ) -> models.AdmissionResponse:
        """Admit a warm kernel: it holds pool capacity, counts against no quota, never
        queues (409 ``pool_full`` when the pool has no room or users wait for it)."""
        who.require_service("start warm kernels")
        decision = await scheduler.admitter.admit(
            kernel_id=body.kernel_id, user=WARM_USER, groups=[], kernelspec=kernelspec,
            warm=True,
        )  # fmt: skip
        return _admitted(decision)

    @router.post("/warm-pools/{kernelspec}/claims", response_model=models.AdmissionResponse)
    async def claim(
        kernelspec: str, body: ClaimRequest, who: CallerDep
    ) -> models.AdmissionResponse:
        """Give a warm kernel to a user: 403 as a cold start would be refused (quota,
        groups), 409 ``warm_taken`` if it is not warm any more, 404 if it has no lease."""
        who.require_service("claim warm kernels")
        decision = await claims.claim(
            kernel_id=body.kernel_id, user=body.user, groups=body.groups,
            kernelspec=kernelspec, admin=body.admin,
        )  # fmt: skip
        scheduler.metrics.admission("admitted", "warm")
        scheduler.warm_claimed(decision.lease)
        return _admitted(decision)

    return router
