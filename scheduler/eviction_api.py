"""``GET /v1/evictions``: the latest evictions, newest first (admins; users see their own)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from .api import caller
from .auth import Caller
from .eviction import KEEP_RECORDS, EvictionStore
from .service import Scheduler


def eviction_router(scheduler: Scheduler) -> APIRouter:
    """The ``/v1/evictions`` route over ``scheduler``'s Redis."""
    router = APIRouter(prefix="/v1", tags=["evictions"])
    store = EvictionStore(scheduler.redis, location=scheduler.location)

    @router.get("/evictions")
    async def evictions(
        who: Annotated[Caller, Depends(caller)],
        user: str | None = None,
        limit: Annotated[int, Query(ge=1, le=KEEP_RECORDS)] = 100,
    ) -> dict[str, list[dict[str, object]]]:
        """Evictions (kernel, user, kernelspec, reason, idle_s, gpus, gpu_hours_freed, at)."""
        if user is None:
            who.require_admin()
        else:
            who.require_self_or_admin(user)
        found = await store.list(limit=limit, user=user)
        return {"evictions": [asdict(e) for e in found]}

    return router
