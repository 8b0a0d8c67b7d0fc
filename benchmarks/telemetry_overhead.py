"""What telemetry costs: the no-op burst on SQLite with telemetry off, no-op, unsampled and on.

Every case drains the same backlog of N messages with a no-op handler, each in fresh processes
(one publishes with the case's telemetry, so the envelopes carry the same trace context a real
publisher writes; one drains, timed):

- ``off``: no providers set (the OpenTelemetry API's proxy providers): what `eventfn run` does
  without ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``--otel``.
- ``noop``: the API's no-op tracer and meter providers set explicitly.
- ``unsampled``: an SDK tracer provider whose sampler drops every trace, and an SDK meter
  provider with no reader: spans are made but never recorded.
- ``memory``: SDK providers that record everything: spans through a ``BatchSpanProcessor``
  into the SDK's in-memory exporter, metrics into its in-memory reader.

    python benchmarks/telemetry_overhead.py                  # N = 20,000, 3 runs each
    python benchmarks/telemetry_overhead.py --n 5000 --runs 1 --write
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402
import msgspec  # noqa: E402

import eventfn  # noqa: E402
from benchmarks import _fresh as fresh  # noqa: E402
from eventfn import telemetry  # noqa: E402
from eventfn.brokers import from_url  # noqa: E402

CASES = ("off", "noop", "unsampled", "memory")
RESULT = ROOT / "benchmarks" / "results" / "telemetry.json"


class Job(msgspec.Struct, frozen=True):
    n: int


def instrument(case: str) -> Any:
    """Install the case's providers; returns what keeps the recorded spans (or None)."""
    if case == "noop":
        from opentelemetry.metrics import NoOpMeterProvider
        from opentelemetry.trace import NoOpTracerProvider

        telemetry.instrument(NoOpTracerProvider(), NoOpMeterProvider())
    elif case == "unsampled":
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

        telemetry.instrument(TracerProvider(sampler=ALWAYS_OFF), MeterProvider())
    elif case == "memory":
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )

        exporter = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        # a queue that holds the whole run, so that every span is recorded, none dropped
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=1 << 20))
        meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
        telemetry.instrument(tracer_provider, meter_provider)
        return tracer_provider, exporter
    return None


def make_app(seen: bytearray) -> eventfn.App:
    app = eventfn.App("bench")

    @app.on_queue("burst")
    async def noop(job: Job) -> None:
        seen[job.n] = 1

    return app


async def publish(url: str, count: int, case: str) -> None:
    instrument(case)
    app = make_app(bytearray(1))
    await app.connect(url)
    for start in range(0, count, 5000):
        end = min(count, start + 5000)
        await app.publish_many(app.message("burst", Job(n)) for n in range(start, end))
    await app.close()


async def drain(url: str, count: int, case: str) -> dict[str, Any]:
    kept = instrument(case)
    seen = bytearray(count)
    app = make_app(seen)
    async with from_url(url) as broker:
        await app.connect(broker)
        runner = eventfn.Runner(app, broker, concurrency=64, burst=True, poll=0.05)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await runner.run()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        await app.close()
    spans = 0
    if kept is not None:
        provider, exporter = kept
        provider.force_flush()
        spans = len(exporter.get_finished_spans())
    return {
        "missing": count - sum(seen),
        "throughput": count / wall,
        "cpu_us_per_event": cpu / count * 1e6,
        "spans": spans,
    }


def run_case(count: int, case: str) -> dict[str, Any]:
    return fresh.run_case(str(Path(__file__).resolve()), count, case)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3, help="runs per case (median reported)")
    parser.add_argument("--write", action="store_true", help=f"write {RESULT.name}")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case in CASES}
    for _ in range(args.runs):  # interleaved, so that a noisy neighbour hits every case alike
        for case in CASES:
            runs[case].append(run_case(args.n, case))
    rows = []
    off = statistics.median(r["throughput"] for r in runs["off"])
    for case in CASES:
        throughput = [r["throughput"] for r in runs[case]]
        row = {
            "case": case,
            "n": args.n,
            "runs": args.runs,
            "throughput": statistics.median(throughput),
            "throughput_min": min(throughput),
            "throughput_max": max(throughput),
            "cpu_us_per_event": statistics.median(r["cpu_us_per_event"] for r in runs[case]),
            "spans": max(r["spans"] for r in runs[case]),
        }
        row["ratio"] = row["throughput"] / off
        rows.append(row)
        print(
            f"{case:<10} N={args.n:,}  {row['throughput']:>9,.0f} events/s  "
            f"{row['cpu_us_per_event']:5.1f} µs CPU/event  ratio to off {row['ratio']:.2f}  "
            f"(runs: {', '.join(f'{t:,.0f}' for t in throughput)})",
            flush=True,
        )
    if args.write:
        from benchmarks.burst import machine

        doc = {"when": time.strftime("%Y-%m-%d"), "machine": machine(), "cases": rows}
        RESULT.write_text(json.dumps(doc, indent=2) + "\n")
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py")], check=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_publish":
        anyio.run(publish, sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif len(sys.argv) > 1 and sys.argv[1] == "_drain":
        print(json.dumps(anyio.run(drain, sys.argv[2], int(sys.argv[3]), sys.argv[4])))
    else:
        main()
