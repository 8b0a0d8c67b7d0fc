"""A test app for idempotency under crashes: each event's side effect is counted in SQLite.

``COUNTER_DB`` names the SQLite file. Table ``effects`` holds one row per event ``n`` with the
number of times its effect happened; table ``control`` has one row whose ``paused`` flag, when
set, makes every handler that starts from then on park before its effect (holding its key in
progress, lease renewed) instead of counting. Checking the flag and counting are one
transaction, so once a test has set the flag, no handler counts any more: the test can kill the
runner at a moment when no handler is between its effect and its completion record.

``HANDLER_SLEEP`` makes each handler take that long before its effect.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing

import anyio
import msgspec

import eventfn

COUNTER_DB = os.environ.get("COUNTER_DB", "counter.db")
SLEEP = float(os.environ.get("HANDLER_SLEEP", "0"))


class Job(msgspec.Struct, frozen=True):
    n: int


def setup(path: str = COUNTER_DB) -> None:
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS effects (n INTEGER PRIMARY KEY, count INTEGER)")
        db.execute("CREATE TABLE IF NOT EXISTS control (paused INTEGER NOT NULL)")
        db.execute("DELETE FROM control")
        db.execute("INSERT INTO control VALUES (0)")


def pause(paused: bool, path: str = COUNTER_DB) -> None:
    with closing(sqlite3.connect(path, timeout=30, isolation_level=None)) as db:
        db.execute("UPDATE control SET paused = ?", (int(paused),))


def _count(n: int) -> bool:
    """Count the effect of event ``n`` unless paused; whether it was counted."""
    with closing(sqlite3.connect(COUNTER_DB, timeout=30, isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")
        [(paused,)] = db.execute("SELECT paused FROM control").fetchall()
        if not paused:
            db.execute(
                "INSERT INTO effects VALUES (?, 1) ON CONFLICT (n) DO UPDATE SET count = count + 1",
                (n,),
            )
        db.execute("COMMIT")
        return not paused


app = eventfn.App("idempotent-counter", retry=eventfn.Retry(attempts=5, backoff=0.05, cap=0.2))


@app.on_queue("jobs", idempotent=True)
async def count(job: Job) -> None:
    if SLEEP:
        await anyio.sleep(SLEEP)
    if not await anyio.to_thread.run_sync(_count, job.n):
        await anyio.sleep_forever()  # paused: hold the key until the process is killed
