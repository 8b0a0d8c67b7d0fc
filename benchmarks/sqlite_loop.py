"""The SQLite broker's own loop against a hand-written sqlite3 loop over the same schema.

    python benchmarks/sqlite_loop.py                  # a queue of 100,000, batches of 256
    python benchmarks/sqlite_loop.py --keys 64        # a stream of 100,000 records on 64 keys

Broker loop: publish N messages, then ``fetch(limit=batch)`` -> ``settle(ack)`` until drained.
Bare loop: the same claim (one ``UPDATE ... RETURNING``), each body decoded (msgspec), and the
acks deleted in one ``BEGIN IMMEDIATE ... COMMIT``, with the plain sqlite3 module and no asyncio.
The ratio of the two is what the broker's Python and aiosqlite cost on top of SQLite itself.
CPU is the process's (``time.process_time``, every thread: aiosqlite runs SQLite on a thread of
its own).
"""

from __future__ import annotations

import argparse
import gc
import json
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import msgspec

from eventfn.brokers.base import OutgoingMessage, Settlement, SubscriptionRef
from eventfn.brokers.sqlite import SQLiteBroker
from eventfn.events import new_id, now_rfc3339

LEASE = 60.0

CLAIM = """
UPDATE deliveries SET attempts = attempts + 1, claims = claims + 1, leased = 1, visible_at = ?3
WHERE seq IN (SELECT seq FROM deliveries WHERE sub = ?1 AND blocked = 0 AND visible_at <= ?2
              ORDER BY visible_at, seq LIMIT ?4)
RETURNING seq, msg_id, body, pkey, published_at, attempts, claims, first_failed_at"""
ACK = "DELETE FROM deliveries WHERE seq = ? AND claims = ? AND leased = 1"


def target(keys: int) -> SubscriptionRef:
    if keys:
        return SubscriptionRef(destination="bench", kind="stream", group="g")
    return SubscriptionRef(destination="bench", kind="queue")


def messages(n: int, keys: int) -> list[OutgoingMessage]:
    """Bodies shaped like eventfn's CloudEvents envelopes (about 250 bytes)."""
    out = []
    for number in range(n):
        message_id = new_id()
        body = msgspec.json.encode(
            {
                "specversion": "1.0",
                "id": message_id,
                "source": "bench",
                "type": "order.accepted",
                "time": now_rfc3339(),
                "datacontenttype": "application/json",
                "data": {"order": 12345, "sku": "ABC-123", "quantity": 3},
            }
        )
        key = f"key-{number % keys}" if keys else None
        out.append(
            OutgoingMessage(
                destination="bench", id=message_id, type="order.accepted", body=body, key=key
            )
        )
    return out


class Measure:
    """Wall time and this process's CPU time (all threads) of a block of work."""

    def __enter__(self) -> Measure:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu

    def line(self, label: str, n: int) -> str:
        rate = n / self.wall
        return f"{label:<12} {rate:>10,.0f} msg/s  {self.cpu / n * 1e6:>6.2f} µs CPU/msg"


async def fill(url: str, ref: SubscriptionRef, batch: list[OutgoingMessage], chunk: int) -> Measure:
    async with SQLiteBroker(url) as broker:
        await broker.declare([ref])
        with Measure() as measure:
            for start in range(0, len(batch), chunk):
                await broker.publish(batch[start : start + chunk])
    return measure


async def drain(url: str, ref: SubscriptionRef, limit: int) -> tuple[Measure, int]:
    handled = 0
    async with SQLiteBroker(url) as broker:
        with Measure() as measure:
            while deliveries := await broker.fetch(ref, limit, lease=LEASE):
                handled += len(deliveries)
                await broker.settle([Settlement(delivery=d, outcome="ack") for d in deliveries])
    return measure, handled


def bare_drain(path: str, ref: SubscriptionRef, limit: int) -> tuple[Measure, int]:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    [(sub,)] = db.execute("SELECT id FROM subscriptions WHERE name = ?", (ref.name,))
    handled = 0
    decode = msgspec.json.Decoder().decode
    with Measure() as measure:
        while True:
            now = time.time()
            rows = db.execute(CLAIM, (sub, now, now + LEASE, limit)).fetchall()
            if not rows:
                break
            claimed = [(row[0], row[6], row[1], decode(row[2])) for row in rows]
            handled += len(claimed)
            db.execute("BEGIN IMMEDIATE")
            db.executemany(ACK, [(seq, claims) for seq, claims, _, _ in claimed])
            db.execute("COMMIT")
    db.close()
    return measure, handled


def one_round(args: argparse.Namespace, swap: bool) -> dict[str, Measure]:
    """Fill two fresh files, then drain one with the broker and one with the bare loop."""
    ref = target(args.keys)
    batch = messages(args.n, args.keys)
    results: dict[str, Measure] = {}
    with tempfile.TemporaryDirectory() as tmp:
        broker_url, bare_path = f"sqlite:///{Path(tmp, 'broker.db')}", str(Path(tmp, "bare.db"))
        results["publish"] = anyio.run(fill, broker_url, ref, batch, args.publish_batch)
        anyio.run(fill, f"sqlite:///{bare_path}", ref, batch, args.publish_batch)
        # 100,000 live messages make every garbage collection slow: keep them out of the drains.
        del batch
        gc.collect()
        loops: list[tuple[str, Callable[[], tuple[Measure, int]]]] = [
            ("broker loop", lambda: anyio.run(drain, broker_url, ref, args.batch)),
            ("bare loop", lambda: bare_drain(bare_path, ref, args.batch)),
        ]
        # Whichever drain runs first after the fills is a little slower: alternate the order.
        for label, loop in reversed(loops) if swap else loops:
            measure, handled = loop()
            assert handled == args.n, f"{label} drained {handled} of {args.n}"
            results[label] = measure
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("-n", type=int, default=100_000, help="messages (default 100000)")
    parser.add_argument("--batch", type=int, default=256, help="fetch limit (default 256)")
    parser.add_argument("--keys", type=int, default=0, help="a stream with this many keys")
    parser.add_argument("--publish-batch", type=int, default=1000, help="messages per publish")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the best is shown")
    parser.add_argument("--json", action="store_true", help="print medians of the rounds as JSON")
    args = parser.parse_args()
    if args.json:
        rounds = [one_round(args, swap=r % 2 == 1) for r in range(args.rounds)]
        out = {}
        for label in ("broker loop", "bare loop"):
            rates = [args.n / r[label].wall for r in rounds]
            out[label.split()[0]] = {
                "throughput": statistics.median(rates),
                "throughput_min": min(rates),
                "throughput_max": max(rates),
                "cpu_us_per_message": statistics.median(r[label].cpu for r in rounds)
                / args.n
                * 1e6,
            }
        print(json.dumps({"n": args.n, "rounds": args.rounds, **out}))
        return
    shape = f"a stream on {args.keys} keys" if args.keys else "a queue"
    print(f"{args.n:,} messages to {shape}, fetch limit {args.batch}, best of {args.rounds}")
    best: dict[str, Measure] = {}
    for round_ in range(args.rounds):
        for label, measure in one_round(args, swap=round_ % 2 == 1).items():
            if label not in best or measure.wall < best[label].wall:
                best[label] = measure
    for label, measure in best.items():
        print(measure.line(label, args.n))
    broker, bare = best["broker loop"], best["bare loop"]
    print(
        f"broker/bare: {bare.wall / broker.wall:.2f}x the rate, "
        f"{broker.cpu / bare.cpu:.2f}x the CPU per message"
    )


if __name__ == "__main__":
    main()
