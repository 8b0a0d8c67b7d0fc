"""The runner's no-op burst on the PostgreSQL broker, beside the broker's own loop and a bare one.

    python benchmarks/postgresql_loop.py                       # N = 20,000, concurrency 64
    python benchmarks/postgresql_loop.py --n 50000 --rounds 5
    python benchmarks/postgresql_loop.py --url postgresql://user@host:5432/db

Each drain runs in a fresh process, after another process published the backlog into a fresh
namespace (dropped at the end):

- runner: ``eventfn.Runner`` in burst mode with a no-op handler (decode, middleware, settle);
- broker loop: ``fetch(limit=batch)`` then ``settle(ack)`` until drained, no runner;
- bare loop: the broker's claim statement and a fenced ``DELETE ... USING unnest(...)`` with
  asyncpg alone, one after the other: the floor that the driver and the server set.

"client CPU" is the draining process's own (``time.process_time``): the cost per message that
the runner adds. "server CPU" is what every ``postgres`` process on this machine used while the
drain process ran (from ``/proc``, ended backends included through their parent's count; when
the server is elsewhere it shows as 0). The best (least client CPU) of ``--rounds`` is shown.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import anyio  # noqa: E402
import asyncpg  # noqa: E402
import msgspec  # noqa: E402
from eventfn_postgresql import PostgresBroker  # noqa: E402

import eventfn  # noqa: E402
from eventfn.brokers import Settlement, SubscriptionRef, from_url  # noqa: E402

QUEUE = SubscriptionRef(destination="burst", kind="queue")
LEASE = 60.0


class Job(msgspec.Struct, frozen=True):
    n: int


def make_app(seen: bytearray) -> eventfn.App:
    app = eventfn.App("bench")

    @app.on_queue("burst")
    async def noop(job: Job) -> None:
        seen[job.n] = 1

    return app


async def publish(url: str, count: int) -> None:
    app = make_app(bytearray(1))
    await app.connect(url)
    for start in range(0, count, 5000):
        batch = range(start, min(count, start + 5000))
        await app.publish_many(app.message("burst", Job(n)) for n in batch)
    await app.close()


async def drain_runner(url: str, count: int, concurrency: int) -> dict[str, Any]:
    seen = bytearray(count)
    app = make_app(seen)
    async with from_url(url) as broker:
        await app.connect(broker)
        runner = eventfn.Runner(app, broker, concurrency=concurrency, burst=True, poll=0.05)
        cpu, wall = time.process_time(), time.perf_counter()
        await runner.run()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        await app.close()
    return {"handled": sum(seen), "cpu": cpu, "wall": wall}


async def drain_broker(url: str, count: int, batch: int) -> dict[str, Any]:
    handled = 0
    async with from_url(url) as broker:
        cpu, wall = time.process_time(), time.perf_counter()
        while deliveries := await broker.fetch(QUEUE, batch, lease=LEASE):
            handled += len(deliveries)
            await broker.settle([Settlement(delivery=d, outcome="ack") for d in deliveries])
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"handled": handled, "cpu": cpu, "wall": wall}


async def drain_bare(url: str, count: int, batch: int) -> dict[str, Any]:
    broker = PostgresBroker(url)
    sql = broker.sql
    ack = (
        f"DELETE FROM {sql.schema}.deliveries AS d USING unnest($1::bigint[], $2::integer[])"
        " AS r (seq, claims) WHERE d.seq = r.seq AND d.claims = r.claims AND d.leased"
    )
    connection = await asyncpg.connect(broker.settings.dsn, server_settings={"jit": "off"})
    sub = await connection.fetchval(sql.subscription_id, QUEUE.name)
    handled = 0
    cpu, wall = time.process_time(), time.perf_counter()
    while True:
        now = time.time()
        rows = await connection.fetch(sql.claim, sub, now, now + LEASE, batch)
        if not rows:
            break
        handled += len(rows)
        await connection.execute(ack, [row[0] for row in rows], [row[6] for row in rows])
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await connection.close()
    return {"handled": handled, "cpu": cpu, "wall": wall}


async def drop(url: str) -> None:
    async with from_url(url) as broker:
        await broker.drop()


def server_cpu() -> float:
    """Seconds of CPU used so far by the PostgreSQL processes on this machine (Linux)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # ended meanwhile
        if text[text.index("(") + 1 : text.rindex(")")] != "postgres":
            continue
        fields = text[text.rindex(")") + 2 :].split()
        # utime, stime, and the children's (ended backends, counted by the postmaster)
        ticks += sum(int(field) for field in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def child(*args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    return result


def one_round(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    drains = {
        "runner": ["_runner", str(args.concurrency)],
        "broker loop": ["_broker", str(args.batch)],
        "bare loop": ["_bare", str(args.batch)],
    }
    for label, how in drains.items():
        separator = "&" if "?" in args.url else "?"
        url = f"{args.url}{separator}namespace=bench_{uuid.uuid4().hex[:10]}"
        try:
            child("_publish", url, str(args.n))
            before = server_cpu()
            result = child(how[0], url, str(args.n), how[1])
            result["server_cpu"] = server_cpu() - before
        finally:
            anyio.run(drop, url)
        if result["handled"] != args.n:
            raise SystemExit(f"{label}: handled {result['handled']} of {args.n}")
        results[label] = result
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--url", default="postgresql://127.0.0.1:5432/test")
    parser.add_argument("--n", type=int, default=20_000, help="messages (default 20000)")
    parser.add_argument("--concurrency", type=int, default=64, help="runner concurrency")
    parser.add_argument("--batch", type=int, default=128, help="fetch limit of the loops")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the best is shown")
    args = parser.parse_args()
    print(
        f"{args.n:,} messages on a queue; runner concurrency {args.concurrency}, "
        f"loops fetch {args.batch}; best of {args.rounds}"
    )
    best: dict[str, dict[str, Any]] = {}
    for _ in range(args.rounds):
        for label, result in one_round(args).items():
            if label not in best or result["cpu"] < best[label]["cpu"]:
                best[label] = result
    for label, result in best.items():
        rate = args.n / result["wall"]
        cpu, server = (result[k] / args.n * 1e6 for k in ("cpu", "server_cpu"))
        print(
            f"{label:<12} {rate:>9,.0f} msg/s  client CPU {cpu:>5.1f} µs/msg  "
            f"server CPU {server:>5.1f} µs/msg"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        how, url, count, option = [*sys.argv[1:], ""][:4]
        if how == "_publish":
            anyio.run(publish, url, int(count))
        else:
            drain = {"_runner": drain_runner, "_broker": drain_broker, "_bare": drain_bare}[how]
            print(json.dumps(anyio.run(drain, url, int(count), int(option))))
    else:
        main()
