"""A clickstream on a partitioned stream: sessions per user, built in each user's click order.

Each click carries the user's own sequence number. The ``clicks`` stream is keyed by
``user_id``, so the ``sessionize`` group sees one user's clicks one at a time and in the order
they were published, across retries and restarts, while different users run in parallel. That
order is what makes the handler simple: a session closes when a click comes more than 30
minutes after the previous one, and the last sequence number seen per user is a watermark, so
a click delivered again after a crash (at least once) is recognised and counted only once.
A second group, ``page-views``, reads the same records for its own purpose (views per page)
and needs no order at all.

Both write to ``$CLICKS_DATA/clicks.db`` (default ``clicks-data/``), a small SQLite file.

Run it (the first run declares the stream and its groups, which start at new records)::

    eventfn run examples.clickstream.clicks:app --burst --broker sqlite:///clicks.db
    printf '%s\\n' '{"user_id": "ada", "seq": 1, "at": 0, "page": "/"}' \\
        '{"user_id": "ada", "seq": 2, "at": 60, "page": "/pricing"}' |
        eventfn publish clicks - --key ada --type click --broker sqlite:///clicks.db
    eventfn run examples.clickstream.clicks:app --burst --broker sqlite:///clicks.db
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, closing, contextmanager
from pathlib import Path

import anyio
import msgspec

import eventfn

SESSION_GAP = 30 * 60.0
"""Seconds of inactivity after which a user's next click starts a new session."""


class Click(msgspec.Struct, frozen=True):
    """One page view; ``seq`` counts the user's clicks from 1, ``at`` is epoch seconds."""

    user_id: str
    seq: int
    at: float
    page: str


app = eventfn.App("clickstream", retry=eventfn.Retry(attempts=4, backoff=0.2, cap=2.0))


def data_dir() -> Path:
    """Where the example keeps its SQLite file (``$CLICKS_DATA``)."""
    return Path(os.environ.get("CLICKS_DATA", "clicks-data"))


SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    user_id TEXT, number INTEGER, started REAL, ended REAL, clicks INTEGER,
    first_seq INTEGER, last_seq INTEGER, PRIMARY KEY (user_id, number));
CREATE TABLE IF NOT EXISTS views (message_id TEXT PRIMARY KEY, page TEXT);
"""


def prepare_store() -> None:
    """Create the tables and put the file in WAL mode, once per runner, before any handler.

    Switching the journal mode takes the file's exclusive lock, and SQLite may refuse that at
    once (without waiting its busy timeout) when other connections are open: done by every
    handler, the first concurrent ones could fail with "database is locked"."""
    data_dir().mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(data_dir() / "clicks.db", timeout=10)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)


@app.lifespan
@asynccontextmanager
async def store(app: eventfn.App) -> AsyncIterator[None]:
    await anyio.to_thread.run_sync(prepare_store)
    yield


@contextmanager
def transaction() -> Iterator[sqlite3.Connection]:
    """One write transaction on the example's store (see :func:`prepare_store`)."""
    db = sqlite3.connect(data_dir() / "clicks.db", timeout=10, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")  # read and write under one lock: no stale reads
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    finally:
        db.close()


@app.on_stream("clicks", key="user_id", group="sessionize")
async def sessionize(click: Click, ctx: eventfn.Context) -> None:
    # A transient failure on some first attempts: the record waits for its retry, and the
    # user's later clicks wait behind it (other users go on), so the order still holds.
    if ctx.attempt == 1 and click.seq % 7 == 3:
        raise ConnectionError("session store busy")
    await anyio.to_thread.run_sync(extend_session, click)


def extend_session(click: Click) -> None:
    """Add ``click`` to its user's current session, or open the next one."""
    with transaction() as db:  # the click counts once or not at all
        last = db.execute(
            "SELECT number, ended, last_seq FROM sessions WHERE user_id = ? "
            "ORDER BY number DESC LIMIT 1",
            (click.user_id,),
        ).fetchone()
        if last is not None and click.seq <= last[2]:
            return  # delivered again after its effect committed: already counted
        if last is None or click.at - last[1] > SESSION_GAP:
            number = 1 if last is None else last[0] + 1
            db.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, 1, ?, ?)",
                (click.user_id, number, click.at, click.at, click.seq, click.seq),
            )
        else:
            db.execute(
                "UPDATE sessions SET ended = ?, clicks = clicks + 1, last_seq = ? "
                "WHERE user_id = ? AND number = ?",
                (click.at, click.seq, click.user_id, last[0]),
            )


@app.on_stream("clicks", key="user_id", group="page-views")
async def count_page_views(click: Click, ctx: eventfn.Context) -> None:
    await anyio.to_thread.run_sync(record_view, ctx.message_id, click.page)


def record_view(message_id: str, page: str) -> None:
    """Count a view once per message, whatever the order or the redeliveries."""
    with transaction() as db:
        db.execute("INSERT OR IGNORE INTO views VALUES (?, ?)", (message_id, page))
