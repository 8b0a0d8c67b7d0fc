"""What every benchmark measures the same way: latency histograms, peak RSS, the machine.

Plain standard library, so the peers' own venv (``.venv-bench``) can import it as well.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import sqlite3
import statistics
import threading
from pathlib import Path
from typing import Any


class Histogram:
    """Log-scale buckets, 2% wide, from 1 µs to about 3 hours: fixed memory, ~1% error.

    ``add`` is safe from several threads (a thread-pool worker of a peer tool records here)."""

    RATIO = 1.02
    SIZE = 1200

    def __init__(self) -> None:
        self.counts = [0] * self.SIZE
        self.max = 0.0
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        micro = max(seconds * 1e6, 1.0)
        bucket = min(int(math.log(micro, self.RATIO)), self.SIZE - 1)
        with self._lock:
            self.max = max(self.max, seconds)
            self.counts[bucket] += 1

    @property
    def total(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> float:
        """Seconds below which a fraction ``q`` of the samples fall (bucket midpoint)."""
        target = q * self.total
        seen = 0
        for bucket, count in enumerate(self.counts):
            seen += count
            if count and seen >= target:
                return float(min(self.RATIO ** (bucket + 0.5) / 1e6, self.max))
        return self.max

    def cdf(self, points: int = 60) -> list[list[float]]:
        """About ``points`` [milliseconds, fraction at or below] pairs, for a latency CDF plot."""
        total = self.total
        if not total:
            return []
        out: list[list[float]] = []
        seen = 0
        step = 1.0 / points
        next_fraction = 0.0
        for bucket, count in enumerate(self.counts):
            if not count:
                continue
            seen += count
            fraction = seen / total
            if fraction >= next_fraction or fraction == 1.0:
                ms = min(self.RATIO ** (bucket + 1) / 1e3, self.max * 1e3)
                out.append([round(ms, 4), round(fraction, 5)])
                next_fraction = fraction + step
        return out

    def summary(self) -> dict[str, Any]:
        """p50/p90/p99/max in milliseconds and the CDF points: what a result records."""
        return {
            "p50_ms": self.quantile(0.50) * 1e3,
            "p90_ms": self.quantile(0.90) * 1e3,
            "p99_ms": self.quantile(0.99) * 1e3,
            "max_ms": self.max * 1e3,
            "cdf": self.cdf(),
        }


def peak_rss_mb() -> float:
    """This process's own peak RSS. ``ru_maxrss`` is not: Linux carries the parent's peak over
    fork + exec, so a child of a big parent reports at least the parent's size."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict[str, Any]:
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
    }


def spread(runs: list[dict[str, Any]], key: str = "throughput") -> dict[str, float]:
    """Median, min and max of one measure over several runs."""
    values = [r[key] for r in runs]
    return {key: statistics.median(values), f"{key}_min": min(values), f"{key}_max": max(values)}


def median_of(runs: list[dict[str, Any]], keys: list[str]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in keys if key in runs[0]}
