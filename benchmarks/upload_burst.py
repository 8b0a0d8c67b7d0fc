"""Upload burst: N small files dropped into a watched bucket; time until every one is handled.

A runner (in this process, SQLite broker, one ``on_upload`` handler that counts keys) watches an
empty bucket; a separate writer process then writes N small files straight into the bucket
directory, as ``cp`` would. The clock runs from the writer's start to the last handled event;
the runner then keeps running for twice the watcher's settle time to see any event twice.
Every run checks N distinct keys handled, none twice.

    python benchmarks/upload_burst.py                 # N = 10,000, 3 runs
    python benchmarks/upload_burst.py --n 2000 --runs 1 --write
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402

import eventfn  # noqa: E402
from eventfn.brokers import from_url  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "uploads.json"
WRITER = """
import sys, pathlib
inbox = pathlib.Path(sys.argv[1])
for n in range(int(sys.argv[2])):
    (inbox / f"doc-{n:06d}.txt").write_bytes(b"a small document %d\\n" % n)
"""


async def run_once(count: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="eventfn-uploads-") as tmp:
        root = Path(tmp) / "buckets"
        (root / "inbox").mkdir(parents=True)
        app = eventfn.App("uploads", buckets=root)
        seen: Counter[str] = Counter()
        done = anyio.Event()
        last = 0.0

        @app.on_upload(bucket="inbox")
        async def count_it(upload: eventfn.Upload) -> None:
            nonlocal last
            seen[upload.key] += 1
            last = time.perf_counter()
            if len(seen) >= count:
                done.set()

        async with from_url(f"sqlite:///{tmp}/broker.db") as broker:
            await app.connect(broker)
            runner = eventfn.Runner(app, broker, concurrency=64, poll=0.05)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(runner.run)
                await anyio.sleep(1.5)  # the watcher is up and has scanned the empty bucket
                start = time.perf_counter()
                cpu0 = time.process_time()
                writer = await anyio.open_process(
                    [sys.executable, "-c", WRITER, str(root / "inbox"), str(count)]
                )
                await writer.wait()
                written = time.perf_counter() - start
                with anyio.fail_after(600):
                    await done.wait()
                cpu = time.process_time() - cpu0
                await anyio.sleep(2.5)  # more than twice the settle time: a second event shows
                runner.stop()
            await app.close()
    elapsed = last - start
    return {
        "n": count,
        "handled": len(seen),
        "twice": sum(1 for v in seen.values() if v > 1),
        "elapsed": elapsed,
        "written": written,
        "throughput": count / elapsed,
        "cpu_us_per_event": cpu / count * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write", action="store_true", help=f"write {RESULT.name}")
    args = parser.parse_args()
    runs = []
    for _ in range(args.runs):
        result = anyio.run(run_once, args.n)
        if result["handled"] != args.n or result["twice"]:
            raise SystemExit(f"lost or doubled events: {result}")
        runs.append(result)
        print(
            f"N={args.n:,}: all handled {result['elapsed']:.2f}s after the writer started "
            f"(writer took {result['written']:.2f}s), {result['throughput']:,.0f} events/s, "
            f"{result['cpu_us_per_event']:.0f} µs runner CPU/event, none twice",
            flush=True,
        )
    throughput = [r["throughput"] for r in runs]
    row = {
        "n": args.n,
        "runs": args.runs,
        "elapsed": statistics.median(r["elapsed"] for r in runs),
        "written": statistics.median(r["written"] for r in runs),
        "throughput": statistics.median(throughput),
        "throughput_min": min(throughput),
        "throughput_max": max(throughput),
        "cpu_us_per_event": statistics.median(r["cpu_us_per_event"] for r in runs),
    }
    if args.write:
        from benchmarks.burst import machine

        doc = {"when": time.strftime("%Y-%m-%d"), "machine": machine(), "cases": [row]}
        RESULT.write_text(json.dumps(doc, indent=2) + "\n")
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py")], check=True)


if __name__ == "__main__":
    main()
