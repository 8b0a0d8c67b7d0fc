"""The apps of ``benchmarks/workloads.py`` and its two kinds of child process.

``python benchmarks/workloads.py _publish SPEC`` publishes one workload's events and
``... _run SPEC`` runs the runner over them (``SPEC`` is a JSON object: workload, url, n,
concurrency, ...); each prints one JSON object as its last line. The handlers record what
they saw (ids, per-key sequence numbers, latency from publish to handler start) in memory
of fixed size per event, and the run reports it.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from array import array
from collections.abc import AsyncIterator, Iterable
from typing import Any

import anyio
import anyio.lowlevel
import msgspec

import eventfn
from benchmarks._stats import Histogram, peak_rss_mb
from eventfn.brokers import OutgoingMessage, from_url

GROUPS = ("a", "b", "c")
KEYS = 64
BATCH = 5000


class Item(msgspec.Struct, frozen=True):
    n: int


class Record(msgspec.Struct, frozen=True):
    n: int
    k: str  # the partition key: n % KEYS
    seq: int  # this record's place among its key's records: n // KEYS


class Tick(msgspec.Struct, frozen=True):
    n: int
    at: float  # seconds after the publisher's start it was due
    spike: bool = False


class Bench:
    """One workload: its app, how to publish its events, and what its handlers recorded."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.count: int = spec["n"]
        self.app = eventfn.App(f"wl-{spec['workload']}")
        self.latency = Histogram()
        self.redelivered = 0  # deliveries with attempt > 1: expected only after a failure

    def observe(self, ctx: eventfn.Context) -> None:
        self.latency.add(time.time() - ctx.delivery.published_at)
        if ctx.attempt > 1:
            self.redelivered += 1

    def messages(self, start: int, stop: int) -> Iterable[OutgoingMessage]:
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[None]:
        """What the handlers need open (a database), opened before the clock starts."""
        yield

    def result(self) -> dict[str, Any]:
        raise NotImplementedError


def _tally(seen: bytearray) -> tuple[int, int]:
    """(missing, duplicates) of a per-id delivery count."""
    return seen.count(0), sum(c - 1 for c in seen if c > 1)


class Fanout(Bench):
    """One topic, three groups with no-op handlers: every group must see every id once."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        self.seen = {group: bytearray(self.count) for group in GROUPS}
        for group in GROUPS:
            self._subscribe(group)

    def _subscribe(self, group: str) -> None:
        seen = self.seen[group]

        @self.app.on_topic("fanout", group=group)
        async def deliver(item: Item, ctx: eventfn.Context) -> None:
            self.observe(ctx)
            seen[item.n] = min(seen[item.n] + 1, 255)

    def messages(self, start: int, stop: int) -> Iterable[OutgoingMessage]:
        return (self.app.message("fanout", Item(n)) for n in range(start, stop))

    def result(self) -> dict[str, Any]:
        tallies = {group: _tally(seen) for group, seen in self.seen.items()}
        return {
            "deliveries": len(GROUPS) * self.count,
            "missing": sum(m for m, _ in tallies.values()),
            "duplicates": sum(d for _, d in tallies.values()),
            "per_group": {g: {"missing": m, "duplicates": d} for g, (m, d) in tallies.items()},
        }


class Ordered(Bench):
    """A stream of 64 keys: each key's sequence numbers must arrive as 0, 1, 2, ... and no two
    records of one key may be in the handler at once."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        self.seen = bytearray(self.count)
        self.last = [-1] * KEYS
        self.busy = [False] * KEYS
        self.violations = 0
        self.overlaps = 0
        self.examples: list[dict[str, int]] = []

        @self.app.on_stream("ordered", key="k", group="order")
        async def check(record: Record, ctx: eventfn.Context) -> None:
            self.observe(ctx)
            key = int(record.k)
            if self.busy[key]:
                self.overlaps += 1
            self.busy[key] = True
            if record.seq != self.last[key] + 1:
                self.violations += 1
                if len(self.examples) < 5:
                    seen = {"key": key, "expected": self.last[key] + 1, "got": record.seq}
                    self.examples.append({**seen, "attempt": ctx.attempt})
            self.last[key] = record.seq
            self.seen[record.n] = min(self.seen[record.n] + 1, 255)
            await anyio.lowlevel.checkpoint()  # let another record of this key in, if it can
            self.busy[key] = False

    def messages(self, start: int, stop: int) -> Iterable[OutgoingMessage]:
        return (
            self.app.message("ordered", Record(n, str(n % KEYS), n // KEYS))
            for n in range(start, stop)
        )

    def result(self) -> dict[str, Any]:
        missing, duplicates = _tally(self.seen)
        return {
            "missing": missing,
            "duplicates": duplicates,
            "order_violations": self.violations,
            "key_overlaps": self.overlaps,
            "violation_examples": self.examples,
        }


class DbWrite(Bench):
    """A handler that inserts one row per event (``INSERT ... ON CONFLICT DO NOTHING`` on the
    event's id as primary key), with ``rate=`` on the decorator or without."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        self.db: dict[str, Any] = spec["db"]
        self.starts = array("d")
        self.writes = Histogram()
        self.duplicates = 0
        self.insert: Any = None

        @self.app.on_queue("dbwrite", rate=spec["rate"])
        async def write(item: Item, ctx: eventfn.Context) -> None:
            self.starts.append(time.monotonic())
            self.observe(ctx)
            started = time.perf_counter()
            if not await self.insert(item.n, ctx.message_id):
                self.duplicates += 1
            self.writes.add(time.perf_counter() - started)

    def messages(self, start: int, stop: int) -> Iterable[OutgoingMessage]:
        return (self.app.message("dbwrite", Item(n)) for n in range(start, stop))

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[None]:
        if self.db["kind"] == "sqlite":
            import aiosqlite

            async with aiosqlite.connect(self.db["path"], isolation_level=None) as conn:
                await conn.execute("PRAGMA journal_mode = WAL")
                await conn.execute("PRAGMA synchronous = NORMAL")
                await conn.execute("PRAGMA busy_timeout = 30000")

                async def insert_sqlite(n: int, message_id: str) -> bool:
                    sql = "INSERT OR IGNORE INTO rows (n, message_id) VALUES (?, ?)"
                    cursor = await conn.execute(sql, (n, message_id))
                    await cursor.close()
                    return bool(cursor.rowcount == 1)

                self.insert = insert_sqlite
                yield
            return
        import asyncpg

        table = self.db["table"]
        size = self.db["pool"]
        async with asyncpg.create_pool(self.db["dsn"], min_size=size, max_size=size) as pool:
            sql = f"INSERT INTO {table} (n, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"

            async def insert_pg(n: int, message_id: str) -> bool:
                status: str = await pool.execute(sql, n, message_id)
                return status.endswith(" 1")

            self.insert = insert_pg
            yield

    def result(self) -> dict[str, Any]:
        starts = sorted(self.starts)
        most, low = 0, 0
        for high, moment in enumerate(starts):  # the most starts in any window of one second
            while moment - starts[low] >= 1.0:
                low += 1
            most = max(most, high - low + 1)
        span = starts[-1] - starts[0] if len(starts) > 1 else 0.0
        return {
            "duplicates": self.duplicates,
            "max_starts_per_s": most,
            "start_rate": (len(starts) - 1) / span if span else 0.0,
            "write": self.writes.summary(),
        }


def create_rows_table(db: dict[str, Any]) -> None:
    """The table the dbwrite handler fills (SQLite: in a file of its own)."""
    if db["kind"] == "sqlite":
        with contextlib.closing(sqlite3.connect(db["path"])) as conn:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("CREATE TABLE rows (n INTEGER PRIMARY KEY, message_id TEXT NOT NULL)")
            conn.commit()
    else:
        sql = f"CREATE TABLE {db['table']} (n INTEGER PRIMARY KEY, message_id TEXT NOT NULL)"
        anyio.run(_pg, db["dsn"], sql)


def count_and_drop_rows(db: dict[str, Any]) -> tuple[int, int]:
    """(rows, distinct ids) in the dbwrite table; a PostgreSQL table is dropped afterwards (a
    SQLite one goes with its temporary directory)."""
    if db["kind"] == "sqlite":
        with contextlib.closing(sqlite3.connect(db["path"])) as conn:
            rows, distinct = conn.execute("SELECT count(*), count(DISTINCT n) FROM rows").fetchone()
        return int(rows), int(distinct)
    try:
        sql = f"SELECT count(*), count(DISTINCT n) FROM {db['table']}"
        rows, distinct = anyio.run(_pg, db["dsn"], sql)
        return int(rows), int(distinct)
    finally:
        anyio.run(_pg, db["dsn"], f"DROP TABLE IF EXISTS {db['table']}")


async def _pg(dsn: str, sql: str) -> Any:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchrow(sql)
    finally:
        await conn.close()


BENCHES: dict[str, type[Bench]] = {"fanout": Fanout, "ordered": Ordered, "dbwrite": DbWrite}


async def publish(spec: dict[str, Any]) -> dict[str, Any]:
    """Publish a burst workload's N events in batches, before its runner starts."""
    bench = BENCHES[spec["workload"]](spec)
    await bench.app.connect(spec["url"])  # declares the groups, so they see the whole backlog
    started = time.perf_counter()
    for start in range(0, bench.count, BATCH):
        await bench.app.publish_many(bench.messages(start, min(bench.count, start + BATCH)))
    seconds = time.perf_counter() - started
    await bench.app.close()
    return {"published": bench.count, "publish_rate": bench.count / seconds}


async def drain(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the runner in burst mode over the backlog: timed, with this process's CPU."""
    bench = BENCHES[spec["workload"]](spec)
    async with from_url(spec["url"]) as broker, bench.opened():
        await bench.app.connect(broker)
        runner = eventfn.Runner(
            bench.app, broker, concurrency=spec["concurrency"], burst=True, poll=0.05
        )
        cpu0, wall0 = time.process_time(), time.perf_counter()
        summary = await runner.run()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        await bench.app.close()
    return {
        "seconds": wall,
        "cpu_s": cpu,
        "handled": summary.handled,
        "retried": summary.retried,
        "dead_lettered": summary.dead_lettered,
        "redelivered": bench.redelivered,
        "peak_rss_mb": peak_rss_mb(),
        "latency": bench.latency.summary(),
        **bench.result(),
    }
