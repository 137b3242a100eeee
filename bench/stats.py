"""Summaries of timing samples: percentiles, rates and ratios, as plain JSON-able dicts."""

from __future__ import annotations

import math
from collections.abc import Sequence

Summary = dict[str, float | int]


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``samples``, linearly interpolated."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(samples_s: Sequence[float], *, wall_s: float | None = None) -> Summary:
    """p50/p95/p99/mean/min/max in milliseconds of ``samples_s`` (seconds), and their count.

    With ``wall_s`` (the time the whole series took) it also gives ``per_s``: samples per
    second of wall-clock time.
    """
    if not samples_s:
        return {"n": 0}
    ms = [s * 1000 for s in samples_s]
    summary: Summary = {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p95_ms": round(percentile(ms, 95), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "mean_ms": round(sum(ms) / len(ms), 3),
        "min_ms": round(min(ms), 3),
        "max_ms": round(max(ms), 3),
    }
    if wall_s:
        summary["per_s"] = round(len(ms) / wall_s, 1)
    return summary


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline`` rounded to 2 places, or None when either is missing or 0."""
    if value is None or not baseline:
        return None
    return round(value / baseline, 2)
