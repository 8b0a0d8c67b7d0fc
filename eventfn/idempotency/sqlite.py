"""The SQLite idempotency store: one table in a file of its own, shared by every process.

Schema (table ``idempotency_keys``, ``WITHOUT ROWID``: the key is the row)::

    scope TEXT, key TEXT          primary key: subscription name, idempotency key
    state INTEGER                 0 in progress, 1 completed
    fingerprint TEXT              hash of the payload that made the record
    token TEXT                    the holder: new on every acquire
    expires_at REAL               end of the lease (in progress) or of the TTL (completed)
    outcome TEXT                  JSON: stored result and emitted messages, or NULL

plus an index on ``expires_at`` for the sweep.

Writes are batched (group commit): acquires and completions that arrive while the previous batch
is with SQLite go together into **one** ``INSERT ... SELECT FROM json_each(?) ON CONFLICT DO
UPDATE ... WHERE`` statement, its rows carried as one JSON array, so a batch is one awaited call
however many messages it serves. That one statement is what makes acquiring atomic: per row, it
inserts the key in progress, or takes over a record whose stored ``expires_at`` has passed, or
changes nothing; a completion is the same statement, applied only while the row still has the
claim's token. SQLite's write lock serialises it across processes. When the statement changed
as many rows as it carried, every write won and the batch is done; otherwise a second statement
reads the batch's records (as one JSON value) to tell each loser who holds its key.

Why no ``RETURNING``: it hands back one row per step, and this process's lock (the GIL) with
each step; with the event loop busy, each of those hand-overs can wait for the interpreter's
switch interval. One value back per statement keeps a round trip short.

A statement on its own is a transaction that takes the write lock when it starts (what
``BEGIN IMMEDIATE`` does for a longer one), waiting up to the busy timeout for other processes.
The file is in WAL mode with ``synchronous=NORMAL``: a SIGKILL loses nothing committed.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import anyio.abc
import anyio.lowlevel
import msgspec

from eventfn.idempotency.base import (
    DEFAULT_LEASE,
    Claim,
    Clock,
    IdempotencyError,
    IdempotencyRecord,
    IdempotencyStore,
    State,
    log,
)

_BUSY_TIMEOUT = 10.0
_IN_PROGRESS, _COMPLETED = 0, 1
_STATES: dict[int, State] = {_IN_PROGRESS: "in_progress", _COMPLETED: "completed"}
_SWEEP_CHUNK = 1000


_encode = msgspec.json.Encoder().encode

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS idempotency_keys (
        scope TEXT NOT NULL,
        key TEXT NOT NULL,
        state INTEGER NOT NULL,
        fingerprint TEXT NOT NULL,
        token TEXT NOT NULL,
        expires_at REAL NOT NULL,
        outcome TEXT,
        PRIMARY KEY (scope, key)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS idempotency_keys_expiry ON idempotency_keys (expires_at)",
)

# A row of the batch (?1, a JSON array) is [state, scope, key, fingerprint, token, seconds,
# outcome]: state 0 asks to acquire for ``seconds`` (a lease), state 1 to complete for
# ``seconds`` (a TTL). ?2 is now. An acquire wins over an expired record, a completion over its
# own token's record; a row that does not win changes nothing.
_UPSERT = """
INSERT INTO idempotency_keys (scope, key, state, fingerprint, token, expires_at, outcome)
SELECT json_extract(value, '$[1]'), json_extract(value, '$[2]'), json_extract(value, '$[0]'),
       json_extract(value, '$[3]'), json_extract(value, '$[4]'),
       ?2 + json_extract(value, '$[5]'), json_extract(value, '$[6]')
FROM json_each(?1) WHERE true
ON CONFLICT (scope, key) DO UPDATE SET
    state = excluded.state, fingerprint = excluded.fingerprint, token = excluded.token,
    expires_at = excluded.expires_at, outcome = excluded.outcome
WHERE iif(excluded.state = 0, idempotency_keys.expires_at <= ?2,
          idempotency_keys.token = excluded.token)"""

# The records of a batch's keys (?1: a JSON array of [scope, key]) as one JSON text: one row,
# where RETURNING would hand back one row per step and this thread's lock with each.
_RECORDS = """
SELECT json_group_array(json_array(scope, key, state, fingerprint, token, expires_at, outcome))
FROM idempotency_keys WHERE (scope, key) IN (
    SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?1))"""

# ?1: a JSON array of [scope, key, token].
_RELEASE = """
DELETE FROM idempotency_keys WHERE (scope, key, token) IN (
    SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]')
    FROM json_each(?1))"""

# ?1: a JSON array of [scope, key, token, lease]; ?2 now.
_RENEW = """
UPDATE idempotency_keys SET expires_at = ?2 + json_extract(c.value, '$[3]')
FROM json_each(?1) AS c
WHERE idempotency_keys.scope = json_extract(c.value, '$[0]')
  AND idempotency_keys.key = json_extract(c.value, '$[1]')
  AND idempotency_keys.token = json_extract(c.value, '$[2]')
  AND idempotency_keys.state = 0
RETURNING idempotency_keys.token"""

_GET = """
SELECT scope, key, state, fingerprint, token, expires_at, outcome
FROM idempotency_keys WHERE scope = ? AND key = ? AND expires_at > ?"""

_SWEEP = f"""
DELETE FROM idempotency_keys WHERE (scope, key) IN (
    SELECT scope, key FROM idempotency_keys WHERE expires_at <= ?1 LIMIT {_SWEEP_CHUNK})"""


class _Pending:
    """One write waiting for its batch: what it asks, and (once flushed) what came of it.

    ``seconds`` is the lease of an acquire or the TTL of a completion.
    """

    __slots__ = ("claim", "error", "future", "outcome", "result", "seconds")

    def __init__(self, claim: Claim, seconds: float, outcome: msgspec.Raw | None = None) -> None:
        self.claim = claim
        self.seconds = seconds
        self.future: asyncio.Future[None] | None = None
        self.outcome = outcome
        self.result: Claim | IdempotencyRecord | bool | None = None
        self.error: BaseException | None = None

    def resolve(self) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_result(None)


class _Batch:
    """The writes of one round trip."""

    __slots__ = ("acquires", "completes", "releases")

    def __init__(self) -> None:
        self.acquires: list[_Pending] = []
        self.completes: list[_Pending] = []
        self.releases: list[_Pending] = []

    def __bool__(self) -> bool:
        return bool(self.acquires or self.completes or self.releases)

    def pending(self) -> Iterator[_Pending]:
        yield from self.completes
        yield from self.acquires
        yield from self.releases


class SQLiteIdempotencyStore(IdempotencyStore):
    """Idempotency records in a SQLite file (created if missing), shared across processes.

    >>> async with SQLiteIdempotencyStore("shop.idempotency.db") as store: ...
    """

    def __init__(
        self, path: str | Path, *, clock: Clock | None = None, lease: float = DEFAULT_LEASE
    ) -> None:
        import time

        super().__init__(clock=clock or time.time, lease=lease)
        self.path = str(path) if str(path) == ":memory:" else str(Path(path).absolute())
        self._db: aiosqlite.Connection | None = None
        self._next = _Batch()
        self._wake = anyio.Event()
        self._flushing = False
        self._flushed = anyio.Event()

    def describe(self) -> str:
        return f"SQLite {self.path}"

    # -- connection ---------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._db is not None:
            return
        with self._errors("open"):
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(self.path, isolation_level=None, timeout=_BUSY_TIMEOUT)
            try:
                await db.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT * 1000)}")
                await db.execute("PRAGMA journal_mode = WAL")
                await db.execute("PRAGMA synchronous = NORMAL")
                await db.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA:
                    await db.execute(statement)
                await db.execute("COMMIT")
            except BaseException:
                await db.close()
                raise
        self._db = db

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise IdempotencyError(
                f"idempotency store {self.describe()} is not open; use `async with store:`"
            )
        return self._db

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            raise IdempotencyError(
                f"idempotency store {self.describe()}: {what} failed: {type(exc).__name__}: {exc}"
            ) from exc

    # -- batched writes -----------------------------------------------------------------------
    #
    # Callers append to the open batch and wait; the flusher task sends it when it runs, which
    # is after every task that was ready has had its turn, so a batch holds what a whole burst
    # of handlers asked. Waiting is on a bare asyncio future per write: aiosqlite ties this
    # store to asyncio anyway, and it is the cheapest wait there is (two per message).

    async def acquire(
        self, scope: str, key: str, fingerprint: str, *, lease: float
    ) -> Claim | IdempotencyRecord:
        while True:
            claim = Claim(scope, key, fingerprint, self.new_token(), lease, 0.0)
            result = await self._submit(self._next.acquires, _Pending(claim, lease))
            if result is not None:
                assert not isinstance(result, bool)
                return result
            # None: the record went (released) between the two statements of the batch

    async def complete(self, claim: Claim, *, ttl: float, outcome: bytes | None) -> bool:
        raw = None if outcome is None else msgspec.Raw(outcome)
        return await self._submit(self._next.completes, _Pending(claim, ttl, raw)) is True

    async def release(self, claim: Claim) -> None:
        await self._submit(self._next.releases, _Pending(claim, 0.0))

    async def _submit(
        self, queue: list[_Pending], pending: _Pending
    ) -> Claim | IdempotencyRecord | bool | None:
        self._connection()  # fail now, not never, when the store is not open
        future = pending.future = asyncio.get_running_loop().create_future()
        queue.append(pending)
        self._wake.set()
        try:
            await future
        except BaseException:
            # Cancelled: if the key was acquired for this caller just before, give it back
            # (if after, _resolve sees the cancelled future and does).
            if isinstance(pending.result, Claim):
                self._release_later(pending.result)
            raise
        if pending.error is not None:
            raise pending.error
        return pending.result

    def _release_later(self, claim: Claim) -> None:
        self._next.releases.append(_Pending(claim, 0.0))
        self._wake.set()

    def _start(self, tg: anyio.abc.TaskGroup) -> None:
        super()._start(tg)
        tg.start_soon(self._flush_loop)

    async def _drain(self) -> None:
        while self._flushing or self._next:
            self._wake.set()
            await self._flushed.wait()

    async def _flush_loop(self) -> None:
        while True:
            batch = self._next
            if not batch:
                self._wake = anyio.Event()
                await self._wake.wait()
                continue
            self._next = _Batch()
            self._flushing = True
            try:
                await self._flush(batch)
            except Exception as exc:
                error = exc if isinstance(exc, IdempotencyError) else IdempotencyError(str(exc))
                for pending in batch.pending():
                    pending.error = error
            except BaseException:
                closed = IdempotencyError(f"idempotency store {self.describe()} was closed")
                for pending in batch.pending():
                    pending.error = closed
                raise
            finally:
                self._flushing = False
                for pending in batch.pending():
                    pending.resolve()
                self._flushed.set()
                self._flushed = anyio.Event()

    async def _flush(self, batch: _Batch) -> None:
        db = self._connection()
        now = self.clock()
        if batch.releases:
            await self._release(db, batch.releases)
        if not batch.acquires and not batch.completes:
            return
        # Completions first: an acquire of the same key in this batch then sees it completed.
        rows = [_row(_COMPLETED, p) for p in batch.completes]
        rows += [_row(_IN_PROGRESS, p) for p in batch.acquires]
        with self._errors("acquire/complete"):
            cursor = await db.execute(_UPSERT, (_encode(rows), now))
            if cursor.rowcount == len(rows):
                # Every row won (an insert or an update counts one, a loser none): done.
                for pending in batch.completes:
                    pending.result = True
                for pending in batch.acquires:
                    self._resolve(pending, None, now, won=True)
                return
            keys = _encode(
                [(p.claim.scope, p.claim.key) for p in (*batch.completes, *batch.acquires)]
            )
            [(text,)] = await db.execute_fetchall(_RECORDS, (keys,))
        # The records as they stand just after: a write won if its token is there, in the state
        # it asked for (nothing but its own holder replaces a token within a lease or a TTL).
        records = {(r[0], r[1]): r for r in _decode_rows(text)}
        for pending in batch.completes:
            record = records.get((pending.claim.scope, pending.claim.key))
            pending.result = (
                record is not None and record[2] == _COMPLETED and record[4] == pending.claim.token
            )
        for pending in batch.acquires:
            self._resolve(pending, records.get((pending.claim.scope, pending.claim.key)), now)

    async def _release(self, db: aiosqlite.Connection, releases: list[_Pending]) -> None:
        claims = [(p.claim.scope, p.claim.key, p.claim.token) for p in releases]
        try:
            with self._errors("release"):
                await db.execute(_RELEASE, (_encode(claims),))
        except IdempotencyError as exc:
            # The keys stay held until their leases run out; then they are free anyway.
            log.warning("%s", exc)

    def _resolve(
        self, pending: _Pending, record: _Row | None, now: float, won: bool = False
    ) -> None:
        claim = pending.claim
        if won or (record is not None and record[4] == claim.token):
            claim.expires_at = now + claim.lease
            pending.result = claim
            if pending.future is not None and pending.future.cancelled():
                self._release_later(claim)
        elif record is not None:
            pending.result = _record(record)

    # -- the rest: rare, one statement each ------------------------------------------------------

    async def renew(self, claims: Sequence[Claim]) -> list[Claim]:
        if not claims:
            await anyio.lowlevel.checkpoint()
            return []
        now = self.clock()
        payload = _encode([(c.scope, c.key, c.token, c.lease) for c in claims])
        with self._errors("renew"):
            rows = await self._connection().execute_fetchall(_RENEW, (payload, now))
        renewed = {row[0] for row in rows}
        for claim in claims:
            if claim.token in renewed:
                claim.expires_at = now + claim.lease
        return [claim for claim in claims if claim.token not in renewed]

    async def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        with self._errors("get"):
            rows = list(await self._connection().execute_fetchall(_GET, (scope, key, self.clock())))
        return _record(rows[0]) if rows else None

    async def sweep(self) -> int:
        removed = 0
        while True:
            with self._errors("sweep"):
                cursor = await self._connection().execute(_SWEEP, (self.clock(),))
            removed += cursor.rowcount
            if cursor.rowcount < _SWEEP_CHUNK:
                return removed


_Row = tuple[str, str, int, str, str, float, str | None]
_decode_rows = msgspec.json.Decoder(list[_Row]).decode


def _row(state: int, pending: _Pending) -> tuple[Any, ...]:
    claim = pending.claim
    return (
        state,
        claim.scope,
        claim.key,
        claim.fingerprint,
        claim.token,
        pending.seconds,
        pending.outcome,
    )


def _record(row: Sequence[Any]) -> IdempotencyRecord:
    scope, key, state, fingerprint, token, expires_at, outcome = row
    return IdempotencyRecord(
        scope=scope,
        key=key,
        state=_STATES[state],
        fingerprint=fingerprint,
        token=token,
        expires_at=expires_at,
        outcome=None if outcome is None else outcome.encode(),
    )
