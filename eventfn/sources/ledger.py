"""The ledger of a directory bucket: which upload events were claimed and published, shared by
every watcher of the bucket (see :mod:`eventfn.sources.watch`) and by
``DirectoryBucket.mark_published``.

``.eventfn/ledger.sqlite3`` in the bucket has one row per (key, version, event): ``claimed``
when a watcher takes it, inside one write transaction and only if no other watcher holds a fresh
claim; ``published`` once it was published. A claim older than ``claim_timeout`` is taken over
by another watcher; superseded rows are pruned after ``max(300 s, 10 x claim_timeout)``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import msgspec

from eventfn.sources.records import UploadRecord

if TYPE_CHECKING:
    from pathlib import Path

    from eventfn.sources.buckets import DirectoryBucket

_SCHEMA = """CREATE TABLE IF NOT EXISTS uploads (
    key TEXT NOT NULL,
    version TEXT NOT NULL,             -- size-mtime_ns of the content
    event TEXT NOT NULL,               -- created | deleted
    etag TEXT NOT NULL,
    state TEXT NOT NULL,               -- claimed | published
    owner TEXT NOT NULL,               -- the watcher that claimed it
    claimed_at REAL NOT NULL,          -- Unix time, shared by every process
    published_at REAL,
    PRIMARY KEY (key, version, event)
) WITHOUT ROWID"""

_COLUMNS = "(key, version, event, etag, state, owner, claimed_at, published_at)"
_CLAIM = f"INSERT OR REPLACE INTO uploads {_COLUMNS} VALUES (?, ?, ?, ?, 'claimed', ?, ?, NULL)"
_MARK = f"""INSERT INTO uploads {_COLUMNS} VALUES (?, ?, ?, ?, 'published', ?, ?, ?)
    ON CONFLICT (key, version, event) DO UPDATE SET state = 'published', etag = excluded.etag,
    published_at = excluded.published_at"""


class Claims(msgspec.Struct):
    """What a claim found: records this watcher now holds, records already published, and
    records another watcher holds, each with the Unix time its claim expires."""

    mine: list[UploadRecord] = msgspec.field(default_factory=list)
    published: list[UploadRecord] = msgspec.field(default_factory=list)
    held: list[tuple[UploadRecord, float]] = msgspec.field(default_factory=list)


class Ledger:
    """The published events of one bucket; blocking, one connection, safe across threads."""

    def __init__(self, path: Path, *, owner: str, claim_timeout: float = 30.0) -> None:
        self.owner = owner
        self.claim_timeout = claim_timeout
        self.grace = max(300.0, 10 * claim_timeout)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")  # a power cut may lose a mark: resent
            with self._write() as db:
                db.execute(_SCHEMA)
        except BaseException:
            self._db.close()
            raise

    @classmethod
    @contextmanager
    def opened(cls, bucket: DirectoryBucket, owner: str = "put") -> Iterator[Ledger]:
        ledger = cls(bucket.state_dir / "ledger.sqlite3", owner=owner)
        try:
            yield ledger
        finally:
            ledger.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def live(self) -> dict[str, tuple[str, str]]:
        """The published, not since deleted, version and etag of each key."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, version, etag, max(published_at) FROM uploads"
                " WHERE event = 'created' AND state = 'published' GROUP BY key"
            ).fetchall()
        return {key: (version, etag) for key, version, etag, _ in rows}

    def claim(self, records: Sequence[UploadRecord]) -> Claims:
        """Take the records no watcher published or holds (or holds for too long)."""
        found = Claims()
        now = time.time()
        with self._write() as db:
            for r in records:
                row = db.execute(
                    "SELECT state, owner, claimed_at FROM uploads"
                    " WHERE key = ? AND version = ? AND event = ?",
                    (r.key, r.version, r.event),
                ).fetchone()
                if row is not None and row[0] == "published":
                    found.published.append(r)
                elif row is None or row[1] == self.owner or row[2] <= now - self.claim_timeout:
                    db.execute(_CLAIM, (r.key, r.version, r.event, r.etag, self.owner, now))
                    found.mine.append(r)
                else:
                    found.held.append((r, row[2] + self.claim_timeout))
        return found

    def mark(self, records: Sequence[UploadRecord]) -> None:
        """Record these events as published, and forget what they supersede."""
        now = time.time()
        rows = [(r.key, r.version, r.event, r.etag, self.owner, now, now) for r in records]
        created = [(r.key, r.version, now - self.grace) for r in records if r.event == "created"]
        deleted = [(r.key, r.version) for r in records if r.event == "deleted"]
        with self._write() as db:
            db.executemany(_MARK, rows)
            db.executemany(
                "DELETE FROM uploads WHERE key = ? AND NOT (version = ? AND event = 'created')"
                " AND claimed_at < ?",
                created,
            )
            db.executemany(
                "DELETE FROM uploads WHERE key = ? AND version = ? AND event = 'created'", deleted
            )

    def prune(self) -> None:
        """Forget old deletions and abandoned claims (a later sighting claims afresh)."""
        old = time.time() - self.grace
        with self._write() as db:
            db.execute(
                "DELETE FROM uploads WHERE (event = 'deleted' AND published_at < ?)"
                " OR (state = 'claimed' AND claimed_at < ?)",
                (old, old),
            )

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # the write lock first: no upgrade deadlock
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
