"""Elasticity: 1, 2 and 3 runner processes on one networked broker share an I/O-bound backlog.

Each runner process drains with concurrency 16 and a handler that sleeps 10 ms (ideal: 1,600
events/s per runner). The backlog is published first; the runners start together in burst mode
and the drain time is from their start until the last one exits. Every event is counted.

    python benchmarks/scaleout.py --broker redis nats postgresql --n 8000 --write
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402
import msgspec  # noqa: E402

import eventfn  # noqa: E402
from benchmarks.burst import URLS, drop, machine  # noqa: E402

COUNTS = os.environ.get("SCALEOUT_COUNTS", "counts.db")


class Job(msgspec.Struct, frozen=True):
    n: int


app = eventfn.App("scaleout")


_db: sqlite3.Connection | None = None
_lock = threading.Lock()


def _count(n: int) -> None:
    # one connection per runner process, no fsync: the count must not be the bottleneck
    global _db
    with _lock:
        if _db is None:
            _db = sqlite3.connect(COUNTS, timeout=30, check_same_thread=False)
            _db.execute("PRAGMA synchronous=OFF")
        _db.execute("INSERT INTO seen VALUES (?)", (n,))
        _db.commit()


@app.on_queue("scaleout", concurrency=16)
async def work(job: Job) -> None:
    await anyio.sleep(0.01)
    await anyio.to_thread.run_sync(_count, job.n)


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
        counts = str(Path(tmp) / "counts.db")
        with sqlite3.connect(counts) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE seen (n INT)")
        try:
            anyio.run(publish, url, count)
            env = {**os.environ, "SCALEOUT_COUNTS": counts, "PYTHONPATH": str(ROOT)}
            command = [
                sys.executable,
                "-m",
                "eventfn",
                "--log-level",
                "warning",
                "run",
                "benchmarks.scaleout:app",
                "--broker",
                url,
                "--burst",
                "--concurrency",
                "16",
            ]
            started = time.perf_counter()
            processes = [
                subprocess.Popen(command, env=env, cwd=tmp, stdout=subprocess.DEVNULL)
                for _ in range(runners)
            ]
            for process in processes:
                process.wait(timeout=600)
            seconds = time.perf_counter() - started
        finally:
            anyio.run(drop, url)
        with sqlite3.connect(counts) as db:
            distinct = db.execute("SELECT COUNT(DISTINCT n) FROM seen").fetchone()[0]
    if distinct != count:
        raise SystemExit(f"{broker} x{runners}: {count - distinct} events were not handled")
    return {
        "broker": broker,
        "runners": runners,
        "n": count,
        "seconds": seconds,
        "throughput": count / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--broker", nargs="+", default=["redis"], choices=list(URLS))
    parser.add_argument("--n", type=int, default=8000)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    cases = []
    for broker in args.broker:
        base = None
        for runners in (1, 2, 3):
            case = run(broker, runners, args.n)
            base = base or case["throughput"]
            case["ratio"] = case["throughput"] / base
            cases.append(case)
            print(
                f"{broker:<10} runners={runners}  {case['throughput']:8,.0f} events/s  "
                f"x{case['ratio']:.2f} of one runner",
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
