"""Prometheus metrics of the scheduler, in a registry of their own (one per app).

Counters and the latency histogram are updated as requests happen; the gauges of leases
and pool usage are read from Redis when ``/metrics`` is scraped, so every scheduler
replica reports the same shared state.

- ``kernelfleet_scheduler_admissions_total{decision,reason}``: decision is admitted,
  refused or error; reason is new or existing for admissions, else the error code.
- ``kernelfleet_scheduler_admission_seconds``: time to decide, Redis included.
- ``kernelfleet_scheduler_leases{pool,state}``: leases by state per pool.
- ``kernelfleet_scheduler_pool_used{pool,resource}`` and ``..._pool_capacity``: cpus,
  memory (bytes) and gpus.
- ``kernelfleet_scheduler_redis_up``: 1 when the last scrape reached Redis.
"""

from __future__ import annotations

import logging

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .errors import RedisUnavailable
from .service import PoolStatus, Scheduler

log = logging.getLogger(__name__)

NAMESPACE = "kernelfleet_scheduler"
STATES = ("starting", "idle", "busy")
RESOURCES = ("cpus", "memory", "gpus")
__all__ = ["CONTENT_TYPE", "SchedulerMetrics"]


class SchedulerMetrics:
    """The scheduler's metrics; pass ``registry`` to keep tests and apps apart."""

    def __init__(self, *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.admissions = Counter(
            "admissions", "Admission decisions.", ["decision", "reason"],
            namespace=NAMESPACE, registry=self.registry,
        )  # fmt: skip
        self.admission_seconds = Histogram(
            "admission_seconds", "Time to decide an admission, Redis round trip included.",
            namespace=NAMESPACE, registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )  # fmt: skip
        self.leases = Gauge(
            "leases", "Leases by state per pool.", ["pool", "state"],
            namespace=NAMESPACE, registry=self.registry,
        )  # fmt: skip
        self.pool_used = Gauge(
            "pool_used", "Resources held by leases (memory in bytes).", ["pool", "resource"],
            namespace=NAMESPACE, registry=self.registry,
        )  # fmt: skip
        self.pool_capacity = Gauge(
            "pool_capacity", "Pool capacity, overcommit applied (memory in bytes).",
            ["pool", "resource"], namespace=NAMESPACE, registry=self.registry,
        )  # fmt: skip
        self.redis_up = Gauge(
            "redis_up", "1 when the last scrape reached Redis, else 0.",
            namespace=NAMESPACE, registry=self.registry,
        )  # fmt: skip

    def admission(self, decision: str, reason: str) -> None:
        """Count one admission decision."""
        self.admissions.labels(decision=decision, reason=reason).inc()

    def _set_capacity(self, scheduler: Scheduler) -> None:
        for pool in scheduler.pools.values():
            for resource, amount in pool.capacity().items():
                self.pool_capacity.labels(pool=pool.name, resource=resource).set(amount)

    def _set_pool(self, status: PoolStatus) -> None:
        name = status.pool.name
        for resource in RESOURCES:
            self.pool_used.labels(pool=name, resource=resource).set(status.used[resource])
        for state in STATES:
            self.leases.labels(pool=name, state=state).set(status.states.get(state, 0))

    async def refresh(self, scheduler: Scheduler) -> None:
        """Read the gauges from Redis; on failure keep the last values and set redis_up 0."""
        self._set_capacity(scheduler)
        try:
            statuses = await scheduler.pool_status()
        except RedisUnavailable as e:
            log.warning("metrics: %s", e.log_message)
            self.redis_up.set(0)
            return
        self.redis_up.set(1)
        for status in statuses:
            self._set_pool(status)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
