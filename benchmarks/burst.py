"""Burst drain: publish N events to a queue, then drain them with the runner, on any broker.

Each case runs in fresh processes: one publishes the backlog, another runs the runner in burst
mode until drained and reports throughput, end-to-end latency (publish time to handler start),
peak RSS and CPU per event of that process alone. Latencies go into a log-bucket histogram of
fixed size, so the measurement itself does not grow with N.

    python benchmarks/burst.py                      # N = 10,000 and 100,000, no-op and sleep
    python benchmarks/burst.py --big                # adds N = 1,000,000
    python benchmarks/burst.py --n 100000 --handler noop --runs 3 --write
    python benchmarks/burst.py --broker sqlite redis nats postgresql --n 20000   # one table

Networked brokers run against their servers on 127.0.0.1 (see shared/SERVICES.md), each case
in a namespace of its own that is dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402
import msgspec  # noqa: E402

import eventfn  # noqa: E402
from benchmarks._stats import Histogram, machine, peak_rss_mb  # noqa: E402
from eventfn.brokers import from_url  # noqa: E402


class Job(msgspec.Struct, frozen=True):
    n: int


def make_app(
    kind: str, seen: bytearray, latency: Histogram, last: list[float] | None = None
) -> eventfn.App:
    """The benchmark's app; ``last[0]`` becomes the moment the latest handler returned."""
    app = eventfn.App("bench")
    last = [0.0] if last is None else last

    if kind == "noop":

        @app.on_queue("burst")
        async def noop(job: Job, ctx: eventfn.Context) -> None:
            latency.add(time.time() - ctx.delivery.published_at)
            seen[job.n] = 1
            last[0] = time.perf_counter()

    else:

        @app.on_queue("burst")
        async def sleepy(job: Job, ctx: eventfn.Context) -> None:
            latency.add(time.time() - ctx.delivery.published_at)
            seen[job.n] = 1
            await asyncio.sleep(0.005)  # the same call as the peers' handlers
            last[0] = time.perf_counter()

    return app


async def publish(url: str, count: int) -> None:
    app = make_app("noop", bytearray(1), Histogram())
    await app.connect(url)
    batch = 5000
    for start in range(0, count, batch):
        await app.publish_many(
            app.message("burst", Job(n)) for n in range(start, min(count, start + batch))
        )
    await app.close()


async def drain(url: str, count: int, kind: str, concurrency: int) -> dict[str, Any]:
    seen = bytearray(count)
    latency = Histogram()
    last = [0.0]
    app = make_app(kind, seen, latency, last)
    async with from_url(url) as broker:
        await app.connect(broker)
        runner = eventfn.Runner(app, broker, concurrency=concurrency, burst=True, poll=0.05)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        summary = await runner.run()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        await app.close()
    missing = count - sum(seen)
    drained = last[0] - wall0  # as the peers measure: until the last event was handled
    return {
        "handled": summary.handled,
        "missing": missing,
        "seconds": drained,
        "exit_seconds": wall,  # run() returned: the final settles flushed, burst mode noticed
        "throughput": count / drained,
        "cpu_us_per_event": cpu / count * 1e6,
        "peak_rss_mb": peak_rss_mb(),
        **latency.summary(),
    }


URLS = {
    "redis": "redis://127.0.0.1:6379/0?namespace={ns}",
    "nats": "nats://127.0.0.1:4222?namespace={ns}",
    "amqp": "amqp://guest:guest@127.0.0.1:5672/?namespace={ns}",
    "postgresql": "postgresql://127.0.0.1:5432/test?namespace={ns}",
}


async def drop(url: str) -> None:
    async with from_url(url) as broker:
        await broker.drop()


def run_case(broker: str, count: int, kind: str, concurrency: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="eventfn-bench-") as tmp:
        if broker == "sqlite":
            url = f"sqlite:///{tmp}/burst.db"
        else:
            url = URLS[broker].format(ns=f"bench{os.getpid()}x{time.monotonic_ns() % 10**9}")
        me = [sys.executable, str(Path(__file__).resolve())]
        try:
            subprocess.run([*me, "_publish", url, str(count)], check=True)
            out = subprocess.run(
                [*me, "_drain", url, str(count), kind, str(concurrency)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        finally:
            if broker != "sqlite":
                anyio.run(drop, url)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    if result["missing"]:
        raise SystemExit(f"{kind} N={count}: {result['missing']} events were not handled")
    return result


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ["throughput", "cpu_us_per_event", "p50_ms", "p90_ms", "p99_ms", "max_ms"]
    out: dict[str, Any] = {key: statistics.median(r[key] for r in runs) for key in keys}
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)  # the worst run: a peak is a peak
    ordered = sorted(runs, key=lambda r: r["throughput"])
    out["cdf"] = ordered[len(ordered) // 2]["cdf"]  # the latency CDF of the median run
    out["throughput_min"] = min(r["throughput"] for r in runs)
    out["throughput_max"] = max(r["throughput"] for r in runs)
    out["runs"] = len(runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--big", action="store_true", help="add N = 1,000,000")
    parser.add_argument(
        "--handler", choices=["noop", "sleep"], nargs="+", default=["noop", "sleep"]
    )
    parser.add_argument("--broker", choices=["sqlite", *URLS], nargs="+", default=["sqlite"])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3, help="runs per case (median reported)")
    parser.add_argument(
        "--write", action="store_true", help="save results and regenerate RESULTS.md"
    )
    args = parser.parse_args()
    sizes = sorted(set(args.n + ([1_000_000] if args.big else [])))
    cases = []
    for broker in args.broker:
        for kind in args.handler:
            for count in sizes:
                runs = [run_case(broker, count, kind, args.concurrency) for _ in range(args.runs)]
                case = {
                    "broker": broker,
                    "handler": kind,
                    "n": count,
                    "concurrency": args.concurrency,
                    **summarize(runs),
                }
                cases.append(case)
                report(case)
    if args.write:
        write(cases)


def report(case: dict[str, Any]) -> None:
    print(
        f"{case['broker']:<10} {case['handler']:<6} N={case['n']:>9,}  "
        f"{case['throughput']:>9,.0f} events/s "
        f"({case['throughput_min']:,.0f}-{case['throughput_max']:,.0f})  "
        f"{case['cpu_us_per_event']:5.1f} µs CPU/event  p50 {case['p50_ms']:8.1f} ms  "
        f"p99 {case['p99_ms']:8.1f} ms  peak RSS {case['peak_rss_mb']:6.1f} MB",
        flush=True,
    )


def write(cases: list[dict[str, Any]]) -> None:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "burst.json"
    measured = {(c["broker"], c["handler"], c["n"]) for c in cases}
    if path.exists():  # keep earlier cases this run did not measure (e.g. N = 1,000,000)
        earlier = json.loads(path.read_text())["cases"]
        for c in earlier:
            c.setdefault("broker", "sqlite")
        cases += [c for c in earlier if (c["broker"], c["handler"], c["n"]) not in measured]
    order = ["sqlite", *URLS]
    cases.sort(key=lambda c: (order.index(c["broker"]), c["handler"], c["n"]))
    document = {
        "benchmark": "burst",
        "machine": machine(),
        "when": time.strftime("%Y-%m-%d"),
        "cases": cases,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    subprocess.run([sys.executable, str(HERE / "report.py")], check=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_publish":
        anyio.run(publish, sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_drain":
        result = anyio.run(drain, sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
        print(json.dumps(result))
    else:
        main()
