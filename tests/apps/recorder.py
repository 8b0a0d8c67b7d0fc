"""A test app for real runner processes: every handler start and finish is recorded.

``RECORD_DB`` names the SQLite file it writes (``started`` and ``finished`` rows with the
message id, attempt and process id); ``HANDLER_SLEEP`` makes each handler take that long.
"""

from __future__ import annotations

import os
import sqlite3

import anyio
import msgspec

import eventfn

SLEEP = float(os.environ.get("HANDLER_SLEEP", "0"))
RECORD_DB = os.environ.get("RECORD_DB", "records.db")


class Job(msgspec.Struct, frozen=True):
    n: int


def setup(path: str = RECORD_DB) -> None:
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS events (kind TEXT, id TEXT, n INT, attempt INT, pid INT)"
        )


def _write(kind: str, message_id: str, n: int, attempt: int) -> None:
    with sqlite3.connect(RECORD_DB, timeout=30) as db:
        db.execute(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?)", (kind, message_id, n, attempt, os.getpid())
        )


app = eventfn.App("recorder", retry=eventfn.Retry(attempts=5, backoff=0.05, cap=0.2))


@app.on_queue("jobs")
async def work(job: Job, ctx: eventfn.Context) -> None:
    await anyio.to_thread.run_sync(_write, "started", ctx.message_id, job.n, ctx.attempt)
    if SLEEP:
        await anyio.sleep(SLEEP)
    await anyio.to_thread.run_sync(_write, "finished", ctx.message_id, job.n, ctx.attempt)
