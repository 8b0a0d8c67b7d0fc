"""A test app for scale-out and crash tests on any broker.

``EFFECTS_DB`` names the SQLite file where each handled event counts its effect (one row per
event number, ``count`` incremented in the same statement); ``HANDLER_SLEEP`` makes each handler
take that long; ``IDEMPOTENT=1`` turns on the idempotency middleware.
"""

from __future__ import annotations

import os
import sqlite3

import anyio
import msgspec

import eventfn

EFFECTS_DB = os.environ.get("EFFECTS_DB", "effects.db")
SLEEP = float(os.environ.get("HANDLER_SLEEP", "0"))
IDEMPOTENT = os.environ.get("IDEMPOTENT") == "1"


class Job(msgspec.Struct, frozen=True):
    n: int


def setup(path: str = EFFECTS_DB) -> None:
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS effects (n INTEGER PRIMARY KEY, count INT, pid INT)")


def _count(n: int) -> None:
    with sqlite3.connect(EFFECTS_DB, timeout=30) as db:
        db.execute(
            "INSERT INTO effects VALUES (?, 1, ?) "
            "ON CONFLICT (n) DO UPDATE SET count = count + 1, pid = excluded.pid",
            (n, os.getpid()),
        )


app = eventfn.App("scale", retry=eventfn.Retry(attempts=10, backoff=0.05, cap=0.5))


@app.on_queue("scale-jobs", idempotent=IDEMPOTENT)
async def work(job: Job) -> None:
    if SLEEP:
        await anyio.sleep(SLEEP)
    await anyio.to_thread.run_sync(_count, job.n)
