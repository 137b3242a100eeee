"""``/v1/warm-pools``: read and pin warm-pool targets (see :mod:`scheduler.warm`)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from .api import caller
from .auth import Caller
from .service import Scheduler
from .warm import WarmTargets

CallerDep = Annotated[Caller, Depends(caller)]


class WarmTargetRequest(BaseModel):
    """``PUT /v1/warm-pools/{kernelspec}`` body."""

    target: int = Field(ge=0, description="warm kernels to keep ready")


def warm_router(scheduler: Scheduler) -> APIRouter:
    """GET /v1/warm-pools (admins), PUT and DELETE /v1/warm-pools/{kernelspec} (service)."""
    router = APIRouter(prefix="/v1", tags=["warm pools"])
    targets = WarmTargets(scheduler.redis, kernelspecs=scheduler.admitter.kernelspecs,
                          pools=scheduler.pools, location=scheduler.location,
                          leases=scheduler.leases, clock=scheduler.clock)  # fmt: skip

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

    return router
