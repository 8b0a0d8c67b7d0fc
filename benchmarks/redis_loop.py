"""The eventfn runner on Redis against a hand-written redis-py XREADGROUP / XACK loop.

    python benchmarks/redis_loop.py                      # N = 20,000, 3 runs each, median
    python benchmarks/redis_loop.py --parser python      # force redis-py's pure-Python parser
    python benchmarks/redis_loop.py --url redis://127.0.0.1:6379/0 --n 50000 --runs 5

Both drain the same backlog on the same server, each in a fresh process, measured from the
first read to the last ack (publishing is not measured):

- raw loop: ``XREADGROUP COUNT 256`` then ``XACK`` of what came, until nothing comes; bodies
  shaped like eventfn's envelopes (about 250 bytes). No handler, no leases, no fencing.
- runner: ``eventfn.Runner(app, broker, burst=True, concurrency=64)`` with a no-op handler on a
  queue: fetch scripts, decoding, dispatch, settle scripts, lease extension, burst detection.

CPU is the process's (``time.process_time``). redis-py parses replies with hiredis when it is
installed (``pip install "eventfn-redis[hiredis]"``), else in Python; ``--parser python``
makes both sides use the Python parser, which is what a plain install gets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec

HERE = Path(__file__).resolve().parent


class Job(msgspec.Struct, frozen=True):
    n: int


def _use_parser(parser: str) -> None:
    if parser == "python":
        sys.modules["hiredis"] = None  # type: ignore[assignment]  # redis-py falls back


def _body(n: int) -> bytes:
    from eventfn.events import new_id, now_rfc3339

    return msgspec.json.encode(
        {
            "specversion": "1.0",
            "id": new_id(),
            "source": "/bench",
            "type": "job",
            "time": now_rfc3339(),
            "datacontenttype": "application/json",
            "data": {"n": n, "sku": "ABC-123", "quantity": 3},
        }
    )


async def raw_loop(url: str, n: int) -> dict[str, Any]:
    from redis.asyncio import Redis

    key = f"bench-raw-{uuid.uuid4().hex[:8]}"
    async with Redis.from_url(url) as client:
        await client.xgroup_create(key, "g", "0", mkstream=True)
        for start in range(0, n, 1000):
            pipe = client.pipeline(transaction=False)
            for number in range(start, min(n, start + 1000)):
                pipe.xadd(key, {"i": str(number), "b": _body(number)})
            await pipe.execute()
        handled = 0
        cpu, wall = time.process_time(), time.perf_counter()
        while reply := await client.xreadgroup("g", "c", {key: ">"}, count=256):
            ids = [entry_id for entry_id, _ in reply[0][1]]
            handled += len(ids)
            await client.xack(key, "g", *ids)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        await client.delete(key)
    return {"handled": handled, "wall": wall, "cpu": cpu}


async def runner(url: str, n: int, concurrency: int) -> dict[str, Any]:
    import eventfn
    from eventfn.brokers import from_url

    app = eventfn.App("bench")
    seen = bytearray(n)

    @app.on_queue("burst")
    async def noop(job: Job) -> None:
        seen[job.n] = 1

    broker_url = f"{url}?namespace=bench-{uuid.uuid4().hex[:8]}"
    async with from_url(broker_url) as broker:
        await app.connect(broker)
        for start in range(0, n, 5000):
            jobs = range(start, min(n, start + 5000))
            await app.publish_many(app.message("burst", Job(number)) for number in jobs)
        run = eventfn.Runner(app, broker, concurrency=concurrency, burst=True, poll=0.05)
        cpu, wall = time.process_time(), time.perf_counter()
        summary = await run.run()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        await broker.drop()
    assert sum(seen) == n, f"the runner handled {sum(seen)} of {n}"
    return {"handled": summary.handled, "wall": wall, "cpu": cpu}


def child(args: list[str]) -> None:
    import anyio

    what, url, n, parser, concurrency = args[0], args[1], int(args[2]), args[3], int(args[4])
    _use_parser(parser)
    from redis.utils import HIREDIS_AVAILABLE

    if what == "raw":
        result = anyio.run(raw_loop, url, n)
    else:
        result = anyio.run(runner, url, n, concurrency)
    result["hiredis"] = HIREDIS_AVAILABLE
    print(json.dumps(result))


def measure(what: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "_child", what, args.url]
    command += [str(args.n), args.parser, str(args.concurrency)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    if result["handled"] != args.n:
        raise SystemExit(f"{what} handled {result['handled']} of {args.n}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--parser", choices=["installed", "python"], default="installed")
    args = parser.parse_args()
    results: dict[str, list[dict[str, Any]]] = {"raw": [], "runner": []}
    for run in range(args.runs):
        # Whichever goes first meets a colder server and allocator: alternate the order.
        for what in ("raw", "runner") if run % 2 == 0 else ("runner", "raw"):
            results[what].append(measure(what, args))
    rates = {}
    for what, label in (("raw", "raw XREADGROUP/XACK loop"), ("runner", "eventfn runner")):
        rate = statistics.median(args.n / r["wall"] for r in results[what])
        cpu = statistics.median(r["cpu"] / args.n * 1e6 for r in results[what])
        rates[what] = rate
        print(f"{label:<26} {rate:>9,.0f} msg/s  {cpu:6.1f} µs CPU/msg")
    parsing = "hiredis" if results["raw"][0]["hiredis"] else "pure-Python parser"
    print(
        f"runner / raw loop: {rates['runner'] / rates['raw']:.2f}x  "
        f"(N={args.n:,}, concurrency {args.concurrency}, median of {args.runs}, {parsing})"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(sys.argv[2:])
    else:
        main()
