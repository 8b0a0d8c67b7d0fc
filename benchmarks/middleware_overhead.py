"""What the full middleware chain costs: the no-op burst with and without it, on SQLite.

Both cases drain the same backlog of N messages with a no-op handler on the SQLite broker, each
in fresh processes (one publishes, one drains). "bare" has no middleware work to do; "full" has
``idempotent=True, timeout=10, retry=Retry()`` (idempotency on the SQLite store beside the
broker, the timeout, the retry policy). Prints both throughputs and their ratio.

    python benchmarks/middleware_overhead.py                 # N = 100,000, 3 runs each
    python benchmarks/middleware_overhead.py --n 20000 --runs 1
    python benchmarks/middleware_overhead.py --parts --write     # results/middleware.json
"""

from __future__ import annotations

import argparse
import json
import statistics
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
from benchmarks._stats import machine, spread  # noqa: E402
from eventfn.brokers import from_url  # noqa: E402


class Job(msgspec.Struct, frozen=True):
    n: int


def make_app(case: str, seen: bytearray) -> eventfn.App:
    app = eventfn.App("bench")
    options: dict[str, Any] = {}
    if case in ("full", "idempotent"):
        options["idempotent"] = True
    if case in ("full", "timeout"):
        options["timeout"] = 10.0
    if case == "full":
        options["retry"] = eventfn.Retry()

    @app.on_queue("burst", **options)
    async def noop(job: Job) -> None:
        seen[job.n] = 1

    return app


async def publish(url: str, count: int) -> None:
    app = make_app("bare", bytearray(1))
    await app.connect(url)
    for start in range(0, count, 5000):
        end = min(count, start + 5000)
        await app.publish_many(app.message("burst", Job(n)) for n in range(start, end))
    await app.close()


async def drain(url: str, count: int, case: str) -> dict[str, Any]:
    seen = bytearray(count)
    app = make_app(case, seen)
    async with from_url(url) as broker:
        await app.connect(broker)
        runner = eventfn.Runner(app, broker, concurrency=64, burst=True, poll=0.05)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await runner.run()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        await app.close()
    return {
        "missing": count - sum(seen),
        "throughput": count / wall,
        "cpu_us_per_event": cpu / count * 1e6,
    }


def run_case(count: int, case: str) -> dict[str, Any]:
    return fresh.run_case(str(Path(__file__).resolve()), count, case)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3, help="runs per case (median reported)")
    parser.add_argument(
        "--parts", action="store_true", help="also measure idempotency alone and timeout alone"
    )
    parser.add_argument("--write", action="store_true", help="save results/middleware.json")
    args = parser.parse_args()
    cases = ("bare", "full", *(("idempotent", "timeout") if args.parts else ()))
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case in cases}
    for _ in range(args.runs):  # interleaved, so that a noisy neighbour hits every case alike
        for case in cases:
            runs[case].append(run_case(args.n, case))
    medians = {}
    rows = []
    for case in cases:
        medians[case] = statistics.median(r["throughput"] for r in runs[case])
        cpu = statistics.median(r["cpu_us_per_event"] for r in runs[case])
        rows.append({"case": case, "n": args.n, "runs": args.runs, "cpu_us_per_event": cpu})
        rows[-1].update(spread(runs[case]))
        each = ", ".join(f"{r['throughput']:,.0f}" for r in runs[case])
        print(
            f"{case:<10} N={args.n:,}  {medians[case]:>9,.0f} events/s  "
            f"{cpu:5.1f} µs CPU/event  (runs: {each})",
            flush=True,
        )
    for case in cases[1:]:
        print(f"ratio {case}/bare: {medians[case] / medians['bare']:.2f}")
    for row in rows:
        row["ratio"] = row["throughput"] / medians["bare"]
    if args.write:
        document = {"benchmark": "middleware", "machine": machine(), "cases": rows}
        document["when"] = time.strftime("%Y-%m-%d")
        (ROOT / "benchmarks" / "results" / "middleware.json").write_text(
            json.dumps(document, indent=2) + "\n"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_publish":
        anyio.run(publish, sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_drain":
        print(json.dumps(anyio.run(drain, sys.argv[2], int(sys.argv[3]), sys.argv[4])))
    else:
        main()
