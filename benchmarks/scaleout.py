"""Elasticity: 1, 2 and 3 runner processes on one networked broker share an I/O-bound backlog.

Each runner process (``eventfn run --burst``) drains with concurrency 16 and a handler that
sleeps 10 ms (ideal: 1,600 events/s per runner). The backlog is published first; the runners
start together. Each runner records when it handled which event and writes that list when it
exits (its lifespan), so the drain time runs from the first event any runner handled to the last
one, without interpreter start-up; every event is counted once across the runners.

    python benchmarks/scaleout.py --broker redis nats postgresql --n 8000 --runs 3 --write
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402
import msgspec  # noqa: E402

import eventfn  # noqa: E402
from benchmarks._stats import machine, spread  # noqa: E402
from benchmarks.burst import URLS, drop  # noqa: E402

OUT = os.environ.get("SCALEOUT_OUT", ".")


class Job(msgspec.Struct, frozen=True):
    n: int


SLEEP = 0.01
_handled: list[tuple[int, float]] = []

app = eventfn.App("scaleout")


@app.lifespan
@contextlib.asynccontextmanager
async def record(app: eventfn.App) -> AsyncIterator[None]:
    try:
        yield
    finally:
        report = anyio.Path(OUT, f"handled-{os.getpid()}.json")
        await report.write_bytes(msgspec.json.encode(_handled))


@app.on_queue("scaleout", concurrency=16)
async def work(job: Job) -> None:
    _handled.append((job.n, time.time()))
    await anyio.sleep(SLEEP)


async def publish(url: str, count: int) -> None:
    await app.connect(url)
    for start in range(0, count, 1000):
        await app.publish_many(
            app.message("scaleout", Job(n)) for n in range(start, min(count, start + 1000))
        )
    await app.close()


def run(broker: str, runners: int, count: int) -> dict[str, Any]:
    url = URLS[broker].format(ns=f"scale{os.getpid()}x{time.monotonic_ns() % 10**9}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            anyio.run(publish, url, count)
            env = {**os.environ, "SCALEOUT_OUT": tmp, "PYTHONPATH": str(ROOT)}
            command = [sys.executable, "-m", "eventfn", "--log-level", "warning", "run"]
            command += ["benchmarks.scaleout:app", "--broker", url, "--burst"]
            processes = [
                subprocess.Popen(command, env=env, cwd=tmp, stdout=subprocess.DEVNULL)
                for _ in range(runners)
            ]
            codes = [process.wait(timeout=600) for process in processes]
            if any(codes):
                raise SystemExit(f"{broker} x{runners}: runner exit codes {codes}")
        finally:
            anyio.run(drop, url)
        shares = [
            msgspec.json.decode(path.read_bytes(), type=list[tuple[int, float]])
            for path in Path(tmp).glob("handled-*.json")
        ]
    handled = [entry for share in shares for entry in share]
    distinct = len({n for n, _ in handled})
    if distinct != count or len(shares) != runners:
        raise SystemExit(
            f"{broker} x{runners}: {count - distinct} events not handled, {len(shares)} reports"
        )
    times = [at for _, at in handled]
    seconds = max(times) - min(times) + SLEEP  # the last handler's own sleep
    return {
        "broker": broker,
        "runners": runners,
        "n": count,
        "seconds": seconds,
        "throughput": count / seconds,
        "duplicates": len(handled) - distinct,
        "per_runner": sorted(len(share) for share in shares),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--broker", nargs="+", default=["redis"], choices=list(URLS))
    parser.add_argument("--n", type=int, default=8000)
    parser.add_argument("--runs", type=int, default=3, help="runs per case (median reported)")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    cases = []
    for broker in args.broker:
        runs: dict[int, list[dict[str, Any]]] = {1: [], 2: [], 3: []}
        for _ in range(args.runs):  # interleaved, so that drift hits every runner count alike
            for runners in runs:
                runs[runners].append(run(broker, runners, args.n))
        base = statistics.median(r["throughput"] for r in runs[1])
        for runners, measured in runs.items():
            case = {**measured[0], **spread(measured), "runs": len(measured)}
            case["seconds"] = statistics.median(r["seconds"] for r in measured)
            case["duplicates"] = sum(r["duplicates"] for r in measured)
            case["ratio"] = case["throughput"] / base
            cases.append(case)
            print(
                f"{broker:<10} runners={runners}  {case['throughput']:8,.0f} events/s "
                f"({case['throughput_min']:,.0f}-{case['throughput_max']:,.0f})  "
                f"x{case['ratio']:.2f} of one runner  shares {case['per_runner']}",
                flush=True,
            )
    if args.write:
        (HERE / "results").mkdir(exist_ok=True)
        document = {
            "benchmark": "scaleout",
            "machine": machine(),
            "when": time.strftime("%Y-%m-%d"),
            "cases": cases,
        }
        (HERE / "results" / "scaleout.json").write_text(json.dumps(document, indent=2) + "\n")
        subprocess.run([sys.executable, str(HERE / "report.py")], check=True)


if __name__ == "__main__":
    main()
