"""Prometheus metrics of the scheduler, in a registry of their own (one per scheduler).

Counters and histograms are updated as things happen; the gauges of leases, pool usage and
queue lengths are read from Redis when ``/metrics`` is scraped, so every scheduler replica
reports the same shared state.

- ``kernelfleet_scheduler_admissions_total{decision,reason}``: decision is admitted, queued,
  refused or error. Admitted: reason new, existing or queue (admitted from the queue);
  queued: reason pool_full; refused and error: the error code (quota_exceeded, pool_full,
  queue_timeout, queue_left, redis_unavailable, ...).
- ``kernelfleet_scheduler_admission_seconds``: time to decide, Redis included.
- ``kernelfleet_scheduler_queue_length{pool}``: requests waiting per pool.
- ``kernelfleet_scheduler_queue_wait_seconds{pool,outcome}``: how long requests waited;
  outcome admitted, refused, timed_out, left or abandoned.
- ``kernelfleet_scheduler_leases{pool,state}``: live leases by state per pool.
- ``kernelfleet_scheduler_pool_used{pool,resource}`` and ``..._pool_capacity``: cpus,
  memory (bytes) and gpus.
- ``kernelfleet_scheduler_activity_reports_total{result}``: updated, dead, unknown.
- ``kernelfleet_scheduler_reconcile_fixes_total{kind}``: lease_released (no kernel),
  kernel_shutdown (no lease); ``..._reconcile_runs_total{outcome}``: ok, skipped, error.
- ``kernelfleet_scheduler_evictions_total{reason}``: kernels stopped by the scheduler.
- ``kernelfleet_scheduler_eviction_warnings_total{reason}``: eviction warnings sent.
- ``kernelfleet_scheduler_evicted_gpu_hours_total{reason}``: idle GPU-hours given back.
- ``kernelfleet_scheduler_loop_errors_total{loop}``: failed rounds of background loops.
- ``kernelfleet_scheduler_redis_up``: 1 when the last scrape reached Redis.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .errors import RedisUnavailable

if TYPE_CHECKING:
    from .service import PoolStatus, Scheduler

log = logging.getLogger(__name__)

NAMESPACE = "kernelfleet_scheduler"
STATES = ("starting", "idle", "busy")
RESOURCES = ("cpus", "memory", "gpus")
WAIT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
__all__ = ["CONTENT_TYPE", "SchedulerMetrics"]


class SchedulerMetrics:
    """The scheduler's metrics; each instance has its own registry (tests, apps)."""

    def __init__(self, *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()

        def labelled(kind: type, name: str, doc: str, labels: list[str], **extra: object):
            return kind(name, doc, labels, namespace=NAMESPACE, registry=self.registry, **extra)

        self.admissions = labelled(Counter, "admissions", "Admission decisions.",
                                   ["decision", "reason"])  # fmt: skip
        self._admission_counters: dict[tuple[str, str], Any] = {}
        self.admission_seconds = Histogram(
            "admission_seconds", "Time to decide an admission, Redis round trip included.",
            namespace=NAMESPACE, registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )  # fmt: skip
        self.queue_length = labelled(Gauge, "queue_length", "Requests waiting per pool.",
                                     ["pool"])  # fmt: skip
        self.queue_wait = labelled(
            Histogram, "queue_wait_seconds", "Seconds requests waited in a pool's queue.",
            ["pool", "outcome"], buckets=WAIT_BUCKETS,
        )  # fmt: skip
        self.leases = labelled(Gauge, "leases", "Leases by state per pool.", ["pool", "state"])
        self.pool_used = labelled(Gauge, "pool_used",
                                  "Resources held by leases (memory in bytes).",
                                  ["pool", "resource"])  # fmt: skip
        self.pool_capacity = labelled(Gauge, "pool_capacity",
                                      "Pool capacity, overcommit applied (memory in bytes).",
                                      ["pool", "resource"])  # fmt: skip
        self.activity = labelled(Counter, "activity_reports", "Kernel activity reports applied.",
                                 ["result"])  # fmt: skip
        self.reconcile_fixes = labelled(Counter, "reconcile_fixes",
                                        "Differences between leases and EG's kernels fixed.",
                                        ["kind"])  # fmt: skip
        self.reconcile_runs = labelled(Counter, "reconcile_runs", "Reconciliation rounds.",
                                       ["outcome"])  # fmt: skip
        self.evictions = labelled(Counter, "evictions", "Kernels stopped by the scheduler.",
                                  ["reason"])  # fmt: skip
        self.eviction_warnings = labelled(Counter, "eviction_warnings",
                                          "Eviction warnings shown to kernels' clients.",
                                          ["reason"])  # fmt: skip
        self.evicted_gpu_hours = labelled(Counter, "evicted_gpu_hours",
                                          "GPU-hours evicted kernels held while idle.",
                                          ["reason"])  # fmt: skip
        self.loop_errors = labelled(Counter, "loop_errors",
                                    "Failed rounds of background loops.", ["loop"])  # fmt: skip
        self.redis_up = Gauge(
            "redis_up", "1 when the last scrape reached Redis, else 0.",
            namespace=NAMESPACE, registry=self.registry,
        )  # fmt: skip

    def admission(self, decision: str, reason: str) -> None:
        """Count one admission decision."""
        counter = self._admission_counters.get((decision, reason))
        if counter is None:  # labels() is a lookup under a lock: once per kind
            counter = self.admissions.labels(decision=decision, reason=reason)
            self._admission_counters[decision, reason] = counter
        counter.inc()

    def waited(self, pool: str, outcome: str, seconds: float) -> None:
        """Record how long a request waited in ``pool``'s queue before ``outcome``."""
        self.queue_wait.labels(pool=pool, outcome=outcome).observe(max(0.0, seconds))

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
        self.queue_length.labels(pool=name).set(status.queued)

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
