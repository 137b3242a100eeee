"""``GET /metrics``: the gateway's Prometheus metrics (audit buffer depth, writes, drops...).

Like the scheduler's ``/metrics`` it needs no token: it holds counts, never names or code.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from tornado import web


class MetricsHandler(web.RequestHandler):
    """Prometheus text exposition of the process's default registry."""

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(REGISTRY))


def metrics_handlers(base_url: str = "/") -> list[tuple[str, type]]:
    """The handler table entry for ``<base_url>metrics``."""
    return [(base_url.rstrip("/") + "/metrics", MetricsHandler)]
