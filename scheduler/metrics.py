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
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .errors import RedisUnavailable

if TYPE_CHECKING:
    from .service import PoolStatus, Scheduler

log = logging.getLogger(__name__)

NAMESPACE = "kernelfleet_scheduler"
STATES = ("starting", "idle", "busy")
RESOURCES = ("cpus", "memory", "gpus")
WAIT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
__all__ = ["CONTENT_TYPE", "SchedulerMetrics"]


ADMISSION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class AdmissionCounts(Collector):
    """``admissions_total{decision,reason}`` and ``admission_seconds``, counted as plain
    numbers and turned into metrics when scraped.

    Every admission updates both: prometheus_client's Counter and Histogram take a lock per
    update (three per admission), which was ~7% of the scheduler's CPU per decision. The
    scheduler updates these from its one event loop only; a scrape from another thread reads
    numbers that are at worst one admission behind.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.buckets = [0] * (len(ADMISSION_BUCKETS) + 1)  # the last: above the largest
        self.seconds = 0.0

    def observe(self, seconds: float) -> None:
        """One admission took ``seconds`` to decide."""
        self.buckets[bisect_left(ADMISSION_BUCKETS, seconds)] += 1
        self.seconds += seconds

    def collect(self) -> Iterator[Metric]:
        """The two metrics, as Prometheus scrapes them."""
        decisions = CounterMetricFamily(f"{NAMESPACE}_admissions", "Admission decisions.",
                                        labels=["decision", "reason"])  # fmt: skip
        for (decision, reason), count in sorted(self.counts.items()):
            decisions.add_metric([decision, reason], count)
        yield decisions
        cumulative, total = [], 0
        for bound, count in zip((*ADMISSION_BUCKETS, float("inf")), self.buckets, strict=True):
            total += count
            cumulative.append((floatToGoString(bound), total))
        yield HistogramMetricFamily(
            f"{NAMESPACE}_admission_seconds",
            "Time to decide an admission, Redis round trip included.",
            buckets=cumulative, sum_value=self.seconds,
        )  # fmt: skip


class SchedulerMetrics:
    """The scheduler's metrics; each instance has its own registry (tests, apps)."""

    def __init__(self, *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()

        def labelled(kind: type, name: str, doc: str, labels: list[str], **extra: object):
            return kind(name, doc, labels, namespace=NAMESPACE, registry=self.registry, **extra)

        self.decisions = AdmissionCounts()  # admissions_total and admission_seconds
        self.registry.register(self.decisions)
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
        counts = self.decisions.counts
        key = (decision, reason)
        counts[key] = counts.get(key, 0) + 1

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
