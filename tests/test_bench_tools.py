"""The benchmark suite's own arithmetic: latency histograms, targets, the suite's step list.

Benchmarks are never timed here; these check that what RESULTS.md reports is computed right.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from typing import Any

import pytest

from benchmarks._stats import Histogram, spread
from benchmarks._targets import rows


def test_histogram_quantiles_are_within_the_bucket_width() -> None:
    rng = random.Random(7)
    samples = [rng.expovariate(1 / 0.004) for _ in range(50_000)]  # mean 4 ms
    histogram = Histogram()
    for sample in samples:
        histogram.add(sample)
    samples.sort()
    for q in (0.5, 0.9, 0.99):
        exact = samples[int(q * len(samples)) - 1]
        assert histogram.quantile(q) == pytest.approx(exact, rel=0.03)
    assert histogram.max == samples[-1]
    assert histogram.total == len(samples)


def test_histogram_cdf_rises_to_one_and_ends_at_the_maximum() -> None:
    histogram = Histogram()
    for micro in range(1, 10_001):
        histogram.add(micro / 1e6)
    cdf = histogram.cdf(points=50)
    fractions = [fraction for _, fraction in cdf]
    times = [ms for ms, _ in cdf]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert times == sorted(times) and times[-1] == pytest.approx(10.0)
    assert 40 <= len(cdf) <= 60
    summary = histogram.summary()
    assert summary["p50_ms"] == pytest.approx(5.0, rel=0.03)
    assert summary["max_ms"] == pytest.approx(10.0)


def test_histogram_counts_every_sample_from_many_threads() -> None:
    histogram = Histogram()

    def add() -> None:
        for _ in range(20_000):
            histogram.add(0.001)

    threads = [threading.Thread(target=add) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert histogram.total == 80_000


def test_an_empty_histogram_reports_zero() -> None:
    histogram = Histogram()
    assert histogram.quantile(0.99) == 0.0
    assert histogram.cdf() == []


def test_spread_is_median_min_max() -> None:
    runs = [{"throughput": value} for value in (3.0, 1.0, 2.0)]
    assert spread(runs) == {"throughput": 2.0, "throughput_min": 1.0, "throughput_max": 3.0}


def _burst(broker: str, handler: str, n: int, rate: float, cpu: float, rss: float) -> Any:
    return {
        "broker": broker,
        "handler": handler,
        "n": n,
        "throughput": rate,
        "throughput_min": rate * 0.9,
        "throughput_max": rate * 1.1,
        "cpu_us_per_event": cpu,
        "peak_rss_mb": rss,
    }


def _peer(broker: str, tool: str, rate: float) -> Any:
    row = {"broker": broker, "tool": tool, "handler": "noop", "throughput": rate}
    return row | {"throughput_min": rate, "throughput_max": rate}


def test_targets_are_judged_from_the_results() -> None:
    results = {
        "burst": {
            "cases": [
                _burst("redis", "noop", 10_000, 20_000, 30.0, 40.0),
                _burst("redis", "noop", 1_000_000, 20_000, 61.0, 49.0),  # CPU and RSS too high
                _burst("redis", "sleep", 20_000, 11_000, 50.0, 40.0),  # 0.86 of 12,800/s
            ]
        },
        "peers": [
            _peer("redis", "eventfn", 20_000),
            _peer("redis", "faststream", 7_000),  # 2.86x: not met
            _peer("redis", "raw", 36_000),  # 0.56x: met
        ],
        "workloads": {
            "cases": [
                {"broker": "redis", "workload": "steady", "rate": 1000.0}
                | {"latency": {"p99_ms": 80.0}, "pre_spike": {"p99_ms": 9.0}}
            ]
        },
    }
    judged = {row.target: row for row in rows(results)}
    redis_fast = judged["Redis Streams, no-op: >= 3x FastStream's drain throughput"]
    assert redis_fast.met is False and redis_fast.measured.startswith("2.86x")
    assert judged["Redis Streams, no-op: >= 0.5x raw loop's drain throughput"].met is True
    assert judged["NATS JetStream, no-op: >= 3x FastStream's drain throughput"].met is None
    assert judged["redis, `sleep(5 ms)` at concurrency 64: >= 0.85 of 12,800/s"].met is True
    cpu = judged["redis, no-op, default middleware: <= 60 µs runner CPU per event"]
    assert cpu.met is False and "1,000,000" in cpu.measured
    rss = judged["redis: peak RSS at N = 1,000,000 within 1.2x of N = 10,000"]
    assert rss.met is False and rss.measured.endswith("1.23x")
    steady = judged["redis, steady 1,000/s: p99 publish-to-handler latency < 25 ms"]
    assert steady.met is True and "9.0 ms" in steady.measured
    assert judged["sqlite, steady 1,000/s: p99 publish-to-handler latency < 25 ms"].met is None
    assert "**not met**" in redis_fast.cells()


def test_the_suite_lists_its_steps_without_running_them() -> None:
    for profile in ([], ["--full"]):
        out = subprocess.run(
            [sys.executable, "benchmarks/suite.py", *profile, "--list"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert "burst.py" in out and "peers/run.py" in out and "workloads.py" in out
