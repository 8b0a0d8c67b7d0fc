"""``sqlite:///path.db``: the embedded durable broker, shared by every process on one machine.

One database file holds destinations, subscriptions, one row per delivery (per subscription) and
the dead-letter store. Several runner processes on one file are competing consumers: a claim is
one atomic ``UPDATE ... RETURNING``, and SQLite's write lock serialises claims across processes.

Layout of a delivery row, and why:

- ``visible_at`` serves both the lease (now + lease while leased) and a delayed retry (its due
  time), so "due" is the one index range ``visible_at <= now``.
- ``blocked`` is 1 for a stream record that is not the head of its key (an earlier record of the
  same key is still unsettled). Records of one key form a list (``next_seq``, with the key's
  newest record in ``stream_keys``), kept by two triggers: an insert links the new record behind
  the key's tail; deleting a head unblocks its ``next_seq``. A fetch never searches a key's
  backlog for its head, and an ack touches the next record's page, not a per-key index page.
- ``claims`` counts leases handed out and never goes down (``attempts`` does, on release): the
  receipt ``(seq, claims)`` fences a settle from a runner whose lease was taken over.
- ``seq`` is ``AUTOINCREMENT`` so that a deleted row's number is never reused by a new row, which
  would let a stale receipt match it.

A fetch leases the oldest *due* first: by ``visible_at``, then publish order. A retry that comes
due queues behind what came due before it; a released delivery goes back to the front.

Every operation is one awaited statement (a fetch, an all-ack settle, a one-message publish) or
one short ``BEGIN IMMEDIATE`` transaction with one ``executemany`` per kind of change, so the
cost per message is SQLite's, not aiosqlite's (about 100 µs per awaited call). Fetches wake at
once for this instance's own publishes and settles, and poll (1 to 20 ms) for other processes'.

De-duplication (``OutgoingMessage.dedupe``): a batch with such a message is one transaction that
records each one in ``dedupe`` (destination, id, when stored, when its window ends) with an
upsert that succeeds only if no copy was stored within the message's window, then inserts the
messages so recorded (and the others): a record never commits without its message. Each such
transaction also deletes a few more expired records than it adds. A batch without ``dedupe``
runs exactly as before. A record lives for its own window: a later copy with a longer window
than the stored one's may find it gone.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import AsyncIterator, Collection, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiosqlite
import anyio
import anyio.lowlevel
import msgspec

from eventfn.brokers.base import (
    Broker,
    Clock,
    DeadLetterRecord,
    Delivery,
    Failure,
    OutgoingMessage,
    Settlement,
    SubscriptionRef,
    SubscriptionStats,
    dead_letter_from_row,
)
from eventfn.exceptions import (
    BrokerError,
    BrokerUnavailable,
    ConfigurationError,
    UnknownDestination,
)

_json_encode = msgspec.json.Encoder().encode

_SCHEMA_VERSION = 1
_BUSY_TIMEOUT = 5.0
_POLL_MIN = 0.001
_POLL_MAX = 0.02

# Schema version 1. A later version appends its own statements and raises _SCHEMA_VERSION; each
# runs inside the BEGIN IMMEDIATE of _migrate, which re-reads user_version under the write lock.
# An addition that older versions can ignore (a new table) goes in _ADDED instead, without a new
# version, so that runners of an older eventfn keep working on the same file.
_SCHEMA = (
    """CREATE TABLE destinations (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE subscriptions (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        destination TEXT NOT NULL,
        kind TEXT NOT NULL,
        grp TEXT NOT NULL,
        types TEXT
    )""",
    "CREATE INDEX subscriptions_by_destination ON subscriptions (destination)",
    """CREATE TABLE deliveries (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        sub INTEGER NOT NULL,
        msg_id TEXT NOT NULL,
        body BLOB NOT NULL,
        pkey TEXT,
        okey TEXT,
        published_at REAL NOT NULL,
        visible_at REAL NOT NULL,
        blocked INTEGER NOT NULL DEFAULT 0,
        leased INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        claims INTEGER NOT NULL DEFAULT 0,
        first_failed_at REAL,
        next_seq INTEGER
    )""",
    # Index order is the claim order: due time, then publish order (the rowid ends every index).
    "CREATE INDEX deliveries_due ON deliveries (sub, blocked, visible_at)",
    # The newest unsettled record of each stream key of a subscription: a key is absent when it
    # has nothing unsettled.
    """CREATE TABLE stream_keys (
        sub INTEGER NOT NULL,
        okey TEXT NOT NULL,
        tail INTEGER NOT NULL,
        PRIMARY KEY (sub, okey)
    ) WITHOUT ROWID""",
    """CREATE TRIGGER deliveries_link AFTER INSERT ON deliveries
       WHEN NEW.okey IS NOT NULL
       BEGIN
           UPDATE deliveries SET next_seq = NEW.seq WHERE seq = (
               SELECT tail FROM stream_keys WHERE sub = NEW.sub AND okey = NEW.okey
           );
           INSERT INTO stream_keys (sub, okey, tail) VALUES (NEW.sub, NEW.okey, NEW.seq)
               ON CONFLICT (sub, okey) DO UPDATE SET tail = excluded.tail;
       END""",
    # Only a head is ever leased, so only a head is ever deleted: the list never loses a middle.
    """CREATE TRIGGER deliveries_next_head AFTER DELETE ON deliveries
       WHEN OLD.okey IS NOT NULL AND OLD.blocked = 0
       BEGIN
           UPDATE deliveries SET blocked = 0 WHERE seq = OLD.next_seq;
           DELETE FROM stream_keys WHERE sub = OLD.sub AND okey = OLD.okey AND tail = OLD.seq;
       END""",
    """CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        sub INTEGER NOT NULL,
        msg_id TEXT NOT NULL,
        body BLOB NOT NULL,
        pkey TEXT,
        error_type TEXT NOT NULL,
        error_message TEXT NOT NULL,
        traceback TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        first_failed_at REAL NOT NULL,
        last_failed_at REAL NOT NULL,
        published_at REAL NOT NULL,
        replayed INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL DEFAULT 'dead',
        UNIQUE (sub, msg_id)
    )""",
    "CREATE INDEX dead_letters_by_sub ON dead_letters (sub, state)",
)

# Made if missing, at every connect (IF NOT EXISTS: a database made before they existed gets
# them). ``dedupe``: each (destination, id) stored with ``dedupe``, kept until its window ends.
_ADDED = (
    """CREATE TABLE IF NOT EXISTS dedupe (
        destination TEXT NOT NULL,
        msg_id TEXT NOT NULL,
        stored_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        PRIMARY KEY (destination, msg_id)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS dedupe_expiry ON dedupe (expires_at)",
)
_ADDED_NAMES = ("dedupe", "dedupe_expiry")

# A new stream record is blocked when its key already has an unsettled record there.
_BLOCKED = """s.kind = 'stream' AND {key} IS NOT NULL AND EXISTS (
    SELECT 1 FROM stream_keys AS k WHERE k.sub = s.id AND k.okey = {key})"""

# One row per subscription of the destination that takes the message's type.
# ?1 id, ?2 body, ?3 key, ?4 published_at, ?5 visible_at, ?6 type, ?7 destination.
_INSERT = f"""
INSERT INTO deliveries (sub, msg_id, body, pkey, okey, published_at, visible_at, blocked)
SELECT s.id, ?1, ?2, ?3, iif(s.kind = 'stream', ?3, NULL), ?4, ?5, {_BLOCKED.format(key="?3")}
FROM subscriptions AS s
WHERE s.destination = ?7
  AND (s.types IS NULL OR EXISTS (SELECT 1 FROM json_each(s.types) WHERE value = ?6))"""

# An ack's emitted message, inserted only while the ack's delivery is still held (?8, ?9), in
# the transaction that deletes it: a stale ack publishes nothing.
_INSERT_EMITTED = (
    _INSERT + " AND EXISTS (SELECT 1 FROM deliveries WHERE seq = ?8 AND claims = ?9 AND leased = 1)"
)

# RETURNING skips REAL affinity (SQLite stores 5.0 as 5 and hands back an int): hence the casts.
_CLAIM = """
UPDATE deliveries SET attempts = attempts + 1, claims = claims + 1, leased = 1, visible_at = ?3
WHERE seq IN (
    SELECT seq FROM deliveries
    WHERE sub = ?1 AND blocked = 0 AND visible_at <= ?2
    ORDER BY visible_at, seq
    LIMIT ?4
)
RETURNING seq, msg_id, body, pkey, CAST(published_at AS REAL), attempts, claims,
    CAST(first_failed_at AS REAL)"""

# The fence of a settlement: the row is still leased under the receipt's claim. A change that is
# the same for every row of a batch takes all receipts as one JSON array of [seq, claims] (?1),
# so that one execution of one statement does the batch, atomically without BEGIN and COMMIT.
_HELD = """(seq, claims) IN (
    SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?1)
) AND leased = 1"""
_DELETE = f"DELETE FROM deliveries WHERE {_HELD}"
# A released delivery was never started: it goes back to the front, not behind what became due
# while it was leased (a retry, being a failure, goes behind).
_RELEASE = f"""UPDATE deliveries SET attempts = attempts - 1, leased = 0,
    visible_at = min(published_at, ?2) WHERE {_HELD}"""
_EXTEND = f"UPDATE deliveries SET visible_at = ?2 WHERE {_HELD}"
_RETRY = """UPDATE deliveries SET leased = 0, visible_at = ?1, first_failed_at = coalesce(
    first_failed_at, ?2) WHERE seq = ?3 AND claims = ?4 AND leased = 1"""

# Written before the row is deleted (same transaction). A record of the same subscription and
# message (an earlier failure, since replayed) is overwritten in place: same id, replay count kept.
_DEAD = """
INSERT INTO dead_letters (sub, msg_id, body, pkey, error_type, error_message, traceback,
                          attempts, first_failed_at, last_failed_at, published_at)
SELECT sub, msg_id, body, pkey, ?1, ?2, ?3, attempts, coalesce(nullif(first_failed_at, 0), ?4), ?4,
       published_at
FROM deliveries WHERE seq = ?5 AND claims = ?6 AND leased = 1
ON CONFLICT (sub, msg_id) DO UPDATE SET
    body = excluded.body, pkey = excluded.pkey, error_type = excluded.error_type,
    error_message = excluded.error_message, traceback = excluded.traceback,
    attempts = excluded.attempts, first_failed_at = excluded.first_failed_at,
    last_failed_at = excluded.last_failed_at, published_at = excluded.published_at,
    state = 'dead'"""

_STATS = """
SELECT count(*) FILTER (WHERE visible_at <= ?2),
       count(*) FILTER (WHERE visible_at > ?2 AND leased = 1),
       count(*) FILTER (WHERE visible_at > ?2 AND leased = 0),
       (SELECT count(*) FROM dead_letters WHERE sub = ?1 AND state = 'dead')
FROM deliveries WHERE sub = ?1"""

_RECORD = """
SELECT dl.id, s.name, dl.msg_id, dl.body, dl.pkey, dl.error_type, dl.error_message, dl.traceback,
       dl.attempts, dl.first_failed_at, dl.last_failed_at, dl.published_at, dl.replayed, dl.state
FROM dead_letters AS dl JOIN subscriptions AS s ON s.id = dl.sub"""

_REPLAY = f"""
INSERT INTO deliveries (sub, msg_id, body, pkey, okey, published_at, visible_at, blocked)
SELECT s.id, dl.msg_id, dl.body, dl.pkey, iif(s.kind = 'stream', dl.pkey, NULL), dl.published_at,
       ?2, {_BLOCKED.format(key="dl.pkey")}
FROM dead_letters AS dl JOIN subscriptions AS s ON s.id = dl.sub
WHERE dl.id = ?1 AND dl.state = 'dead'"""

_REPLAYED = """UPDATE dead_letters SET state = 'replayed', replayed = replayed + 1
WHERE id = ? AND state = 'dead'"""

# De-duplication (``OutgoingMessage.dedupe``), in the transaction that inserts the messages: a
# window's record and its message commit together. ?1 is a JSON array of [destination, id,
# dedupe], ?2 now. A (destination, id) is recorded, and returned, unless it was stored within
# the last ``dedupe`` seconds; a second one of the same batch conflicts with the first and is
# not. (WHERE true: an upsert's SELECT needs a WHERE clause.)
_DEDUPE_CLAIM = """
INSERT INTO dedupe (destination, msg_id, stored_at, expires_at)
SELECT json_extract(j.value, '$[0]'), json_extract(j.value, '$[1]'), ?2,
       ?2 + json_extract(j.value, '$[2]')
FROM json_each(?1) AS j
WHERE true
ORDER BY j.key
ON CONFLICT (destination, msg_id) DO UPDATE SET
    stored_at = excluded.stored_at, expires_at = excluded.expires_at
WHERE dedupe.stored_at <= excluded.stored_at - (excluded.expires_at - excluded.stored_at)
RETURNING destination, msg_id"""
# Records whose window ended go lazily: a few more than a claim adds, each time (?1 now).
_DEDUPE_SWEEP = """DELETE FROM dedupe WHERE (destination, msg_id) IN (
    SELECT destination, msg_id FROM dedupe WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)"""
_SWEEP_EXTRA = 64
# Which of the receipts (?1) still hold their lease: the acks whose emitted messages count.
_STILL_HELD = f"SELECT seq, claims FROM deliveries WHERE {_HELD}"


class _Waker:
    """Wakes this process's fetches of one subscription when this broker changed something."""

    __slots__ = ("destination", "event")

    def __init__(self, destination: str) -> None:
        self.destination = destination
        self.event = anyio.Event()

    def wake(self) -> None:
        self.event.set()
        self.event = anyio.Event()


class SQLiteBroker(Broker):
    """Durable broker in one SQLite file: ``sqlite:///relative.db`` or ``sqlite:////abs.db``.

    >>> broker = SQLiteBroker("sqlite:///eventfn.db")
    """

    scheme = "sqlite"

    def __init__(self, url: str, *, clock: Clock = time.time) -> None:
        super().__init__(url, clock=clock)
        self.path = _database_path(url, self.describe())
        self._db: aiosqlite.Connection | None = None
        # One connection, one transaction at a time: coroutines must not interleave inside one.
        self._lock = anyio.Lock(fast_acquire=True)
        self._subscriptions: dict[str, int] = {}
        self._destinations: set[str] = set()
        self._wakers: dict[str, _Waker] = {}

    # -- connection ---------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._db is not None:
            return
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(self.path, isolation_level=None, timeout=_BUSY_TIMEOUT)
        except (OSError, sqlite3.Error) as exc:
            raise BrokerUnavailable(f"cannot open SQLite broker {self.describe()}: {exc}") from exc
        try:
            await self._prepare(db)
        except sqlite3.Error as exc:
            await db.close()
            raise BrokerUnavailable(f"cannot use SQLite broker {self.describe()}: {exc}") from exc
        except BaseException:
            await db.close()
            raise
        self._db = db

    async def _prepare(self, db: aiosqlite.Connection) -> None:
        if sqlite3.sqlite_version_info < (3, 35):
            raise BrokerUnavailable(
                f"SQLite broker {self.describe()} needs SQLite 3.35 or later (for RETURNING); "
                f"this Python has {sqlite3.sqlite_version}"
            )
        await db.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT * 1000)}")
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = NORMAL")
        await self._migrate(db)

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        if await _user_version(db) == _SCHEMA_VERSION and await _has_added(db):
            return
        await db.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have created the schema while this one waited for the lock.
            version = await _user_version(db)
            if version > _SCHEMA_VERSION:
                raise BrokerUnavailable(
                    f"SQLite broker {self.describe()} has schema version {version}, newer than "
                    f"this eventfn understands ({_SCHEMA_VERSION}); upgrade eventfn"
                )
            if version < _SCHEMA_VERSION:
                for statement in _SCHEMA:
                    await db.execute(statement)
                await db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            for statement in _ADDED:
                await db.execute(statement)
            await db.execute("COMMIT")
        except BaseException:
            await db.rollback()
            raise

    async def close(self) -> None:
        async with self._lock:
            if self._db is not None:
                db, self._db = self._db, None
                await db.close()

    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise BrokerError(
                f"SQLite broker {self.describe()} is not connected; "
                "use `async with broker:` or await broker.connect() first"
            )
        return self._db

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise BrokerError(
                f"SQLite broker {self.describe()} failed: {type(exc).__name__}: {exc}"
            ) from exc

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction; shielded, so a cancelled caller never leaves one open."""
        db = self._connection()
        async with self._lock:
            with anyio.CancelScope(shield=True), self._errors():
                await db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                    await db.execute("COMMIT")
                except BaseException:
                    await db.rollback()
                    raise

    async def _query(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        """One statement on its own (SQLite makes it atomic); returns its rows."""
        db = self._connection()
        async with self._lock:
            with self._errors():
                return list(await db.execute_fetchall(sql, parameters))

    async def _change(self, sql: str, parameters: Sequence[Any] = ()) -> int:
        """One statement on its own; returns how many rows it changed."""
        db = self._connection()
        async with self._lock:
            with self._errors():
                cursor = await db.execute(sql, parameters)
                return cursor.rowcount

    async def _apply(self, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
        """Execute each statement once per parameter row, all in one transaction."""
        statements = [(sql, rows) for sql, rows in statements if rows]
        if len(statements) == 1 and len(statements[0][1]) == 1:
            # One execution of one statement is a transaction of its own: two round trips fewer.
            sql, [row] = statements[0]
            await self._change(sql, row)
            return
        async with self._transaction() as db:
            for sql, rows in statements:
                await db.executemany(sql, rows)

    # -- subscriptions ------------------------------------------------------------------------

    async def declare(self, subscriptions: Sequence[SubscriptionRef]) -> None:
        declared: dict[str, int] = {}
        async with self._transaction() as db:
            for ref in subscriptions:
                declared[ref.name] = await self._declare(db, ref)
        # Only once committed: a rolled-back declaration must not look known.
        self._subscriptions.update(declared)
        self._destinations.update(ref.destination for ref in subscriptions)

    async def _declare(self, db: aiosqlite.Connection, ref: SubscriptionRef) -> int:
        await db.execute(
            "INSERT INTO destinations (name, kind) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
            (ref.destination, ref.kind),
        )
        [(kind,)] = await db.execute_fetchall(
            "SELECT kind FROM destinations WHERE name = ?", (ref.destination,)
        )
        if kind != ref.kind:
            raise ConfigurationError(
                f"destination {ref.destination!r} is a {kind} on this broker, "
                f"not a {ref.kind}; use another name or the same kind everywhere"
            )
        types = None if ref.types is None else json.dumps(list(ref.types))
        # A redeployed app may subscribe its group to other event types: the latest filter wins.
        await db.execute(
            "INSERT INTO subscriptions (name, destination, kind, grp, types) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET types = excluded.types",
            (ref.name, ref.destination, ref.kind, ref.group, types),
        )
        [(sub_id, destination)] = await db.execute_fetchall(
            "SELECT id, destination FROM subscriptions WHERE name = ?", (ref.name,)
        )
        if destination != ref.destination:
            raise ConfigurationError(
                f"subscription name {ref.name!r} is already used by destination {destination!r}; "
                "rename the destination or the group"
            )
        return int(sub_id)

    async def _sub_id(self, name: str) -> int:
        sub_id = self._subscriptions.get(name)
        if sub_id is None:
            # Declared by another process, or never.
            rows = await self._query("SELECT id FROM subscriptions WHERE name = ?", (name,))
            if not rows:
                raise ConfigurationError(f"subscription {name!r} was never declared")
            sub_id = self._subscriptions[name] = int(rows[0][0])
        return sub_id

    async def _check_destinations(self, names: set[str]) -> None:
        unknown = names - self._destinations
        if not unknown:
            return
        rows = await self._query(
            "SELECT name FROM destinations WHERE name IN (SELECT value FROM json_each(?))",
            (json.dumps(sorted(unknown)),),
        )
        self._destinations.update(row[0] for row in rows)
        missing = sorted(names - self._destinations)
        if missing:
            raise UnknownDestination(
                f"nothing has declared destination {missing[0]!r} on {self.describe()}; "
                "start a runner of an app that subscribes to it (or call app.declare()) first"
            )

    # -- publishing ---------------------------------------------------------------------------

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        if not messages:
            await anyio.lowlevel.checkpoint()
            return
        destinations = {message.destination for message in messages}
        await self._check_destinations(destinations)
        now = self.clock()
        if any(message.dedupe > 0 for message in messages):
            await self._publish_deduped(messages, now)
        else:
            await self._apply([(_INSERT, [_insert_row(message, now) for message in messages])])
        self._wake(destinations=destinations)

    async def _publish_deduped(self, messages: Sequence[OutgoingMessage], now: float) -> None:
        deduped = [(message, None) for message in messages if message.dedupe > 0]
        async with self._transaction() as db:
            first = iter(await _first_of_window(db, deduped, now))
            rows = [_insert_row(m, now) for m in messages if m.dedupe <= 0 or next(first)]
            if rows:
                await db.executemany(_INSERT, rows)

    def _wake(
        self, *, destinations: Collection[str] = (), subscriptions: Iterable[str] = ()
    ) -> None:
        for name in subscriptions:
            waker = self._wakers.get(name)
            if waker is not None:
                waker.wake()
        for waker in self._wakers.values():
            if waker.destination in destinations:
                waker.wake()

    # -- consuming ----------------------------------------------------------------------------

    async def fetch(
        self, subscription: SubscriptionRef, limit: int, *, lease: float, wait: float = 0.0
    ) -> list[Delivery]:
        sub_id = await self._sub_id(subscription.name)
        waker = self._wakers.get(subscription.name)
        if waker is None:
            waker = self._wakers[subscription.name] = _Waker(subscription.destination)
        deadline = anyio.current_time() + wait
        interval = _POLL_MIN
        while True:
            # Taken before the claim, so a wake during the claim is not missed.
            changed = waker.event
            found = await self._claim(sub_id, subscription.name, limit, lease)
            remaining = deadline - anyio.current_time()
            if found or limit <= 0 or remaining <= 0:
                return found
            with anyio.move_on_after(min(interval, remaining)):
                await changed.wait()
            # Another process's publish shows only to a poll: poll slower the longer it is quiet.
            interval = _POLL_MIN if changed.is_set() else min(interval * 2, _POLL_MAX)

    async def _claim(self, sub_id: int, name: str, limit: int, lease: float) -> list[Delivery]:
        if limit <= 0:
            await anyio.lowlevel.checkpoint()
            return []
        now = self.clock()
        # The claim runs to its end even if the caller is cancelled: the rows are leased then,
        # and are given back below rather than left hidden for a lease with an attempt counted.
        with anyio.CancelScope(shield=True):
            rows = await self._query(_CLAIM, (sub_id, now, now + lease, limit))
        rows.sort()
        found = [
            Delivery(
                subscription=name,
                id=msg_id,
                body=body,
                attempt=attempts,
                receipt=(seq, claims),
                key=key,
                published_at=published_at,
                first_failed_at=first_failed_at,
            )
            for seq, msg_id, body, key, published_at, attempts, claims, first_failed_at in rows
        ]
        try:
            await anyio.lowlevel.checkpoint_if_cancelled()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self.settle([Settlement(delivery=d, outcome="release") for d in found])
            raise
        return found

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        if not settlements:
            await anyio.lowlevel.checkpoint()
            return
        plan = _SettlePlan(settlements, self.clock())
        if plan.emitted:
            await self._check_destinations({row[6] for row in plan.emitted})
        if not plan.deduped:
            await self._apply(plan.statements())
        else:
            async with self._transaction() as db:
                deduped = [(message, receipt) for _, message, receipt in plan.deduped]
                first = await _first_of_window(db, deduped, plan.now)
                dropped = {
                    i for (i, _, _), kept in zip(plan.deduped, first, strict=True) if not kept
                }
                plan.emitted = [row for i, row in enumerate(plan.emitted) if i not in dropped]
                for sql, rows in plan.statements():
                    if rows:
                        await db.executemany(sql, rows)
        self._wake(
            destinations={row[6] for row in plan.emitted}, subscriptions=plan.changed_subscriptions
        )

    async def extend(self, deliveries: Sequence[Delivery], lease: float) -> None:
        if not deliveries:
            await anyio.lowlevel.checkpoint()
            return
        receipts = _receipts(d.receipt for d in deliveries)
        await self._apply([(_EXTEND, [(receipts, self.clock() + lease)])])

    async def stats(self, subscription: SubscriptionRef) -> SubscriptionStats:
        sub_id = await self._sub_id(subscription.name)
        [(ready, in_flight, delayed, dead)] = await self._query(_STATS, (sub_id, self.clock()))
        return SubscriptionStats(
            subscription=subscription.name,
            ready=ready,
            delayed=delayed,
            in_flight=in_flight,
            dead=dead,
        )

    # -- dead letters -------------------------------------------------------------------------

    async def dead_letters(
        self, subscription: str | None = None, *, limit: int = 100, after: str | None = None
    ) -> list[DeadLetterRecord]:
        sub_id = None if subscription is None else await self._sub_id(subscription)
        rows = await self._query(
            f"{_RECORD} WHERE dl.state = 'dead' AND (?1 IS NULL OR dl.sub = ?1) AND dl.id > ?2"
            " ORDER BY dl.id LIMIT ?3",
            (sub_id, 0 if after is None else int(after), limit),
        )
        return [_record(row) for row in rows]

    async def dead_letter(self, record_id: str) -> DeadLetterRecord | None:
        record = _record_number(record_id)
        rows = [] if record is None else await self._query(f"{_RECORD} WHERE dl.id = ?", (record,))
        return _record(rows[0]) if rows else None

    async def replay(self, record_ids: Sequence[str]) -> int:
        wanted = sorted({n for n in map(_record_number, record_ids) if n is not None})
        if not wanted:
            await anyio.lowlevel.checkpoint()
            return 0
        now = self.clock()
        async with self._transaction() as db:
            await db.executemany(_REPLAY, [(record, now) for record in wanted])
            cursor = await db.executemany(_REPLAYED, [(record,) for record in wanted])
            replayed = cursor.rowcount
        self._wake(subscriptions=list(self._wakers))
        return replayed

    async def purge(self, subscription: str | None = None) -> int:
        if subscription is None:
            return await self._change("DELETE FROM dead_letters")
        sub_id = await self._sub_id(subscription)
        return await self._change("DELETE FROM dead_letters WHERE sub = ?", (sub_id,))


class _SettlePlan:
    """A batch of settlements as the parameters of each statement that carries it out."""

    def __init__(self, settlements: Sequence[Settlement], now: float) -> None:
        self.now = now
        self.emitted: list[tuple[Any, ...]] = []
        # emitted messages with ``dedupe``: their place in ``emitted``, and the ack's receipt
        self.deduped: list[tuple[int, OutgoingMessage, tuple[int, int]]] = []
        self.dead: list[tuple[Any, ...]] = []
        self.retried: list[tuple[Any, ...]] = []
        self.deleted: list[tuple[int, int]] = []
        self.released: list[tuple[int, int]] = []
        self.changed_subscriptions: set[str] = set()
        for settlement in settlements:
            self._add(settlement)

    def _add(self, settlement: Settlement) -> None:
        delivery = settlement.delivery
        receipt: tuple[int, int] = delivery.receipt
        outcome = settlement.outcome
        if outcome == "ack":
            for message in settlement.emitted:
                if message.dedupe > 0:
                    self.deduped.append((len(self.emitted), message, receipt))
                self.emitted.append((*_insert_row(message, self.now), *receipt))
            self.deleted.append(receipt)
        elif outcome == "retry":
            failed_at = settlement.failure.at if settlement.failure else self.now
            self.retried.append((self.now + settlement.delay, failed_at, *receipt))
        elif outcome == "dead":
            failure = settlement.failure or Failure(error_type="Unknown", message="", at=self.now)
            error = (failure.error_type, failure.message, failure.traceback, failure.at or self.now)
            self.dead.append((*error, *receipt))
            self.deleted.append(receipt)
        else:
            self.released.append(receipt)
        # Rows that may have become fetchable: a retry or release, or the next record of a key.
        if outcome in ("retry", "release") or delivery.key is not None:
            self.changed_subscriptions.add(delivery.subscription)

    def statements(self) -> list[tuple[str, list[tuple[Any, ...]]]]:
        """In order: emitted before their ack's row goes, a dead letter before its row goes."""
        return [
            (_INSERT_EMITTED, self.emitted),
            (_DEAD, self.dead),
            (_DELETE, [(_receipts(self.deleted),)] if self.deleted else []),
            (_RETRY, self.retried),
            (_RELEASE, [(_receipts(self.released), self.now)] if self.released else []),
        ]


async def _first_of_window(
    db: aiosqlite.Connection,
    messages: Sequence[tuple[OutgoingMessage, tuple[int, int] | None]],
    now: float,
) -> list[bool]:
    """Record these messages with ``dedupe`` (each with the receipt of the ack that emits it,
    or None), in the caller's transaction; for each, whether it is the first of its window and
    is to be stored. The emitted messages of a stale ack (its lease lost) record nothing and are
    not stored. Expired records of any destination are swept on the way."""
    live = [True] * len(messages)
    receipts = {receipt for _, receipt in messages if receipt is not None}
    if receipts:
        rows = await db.execute_fetchall(_STILL_HELD, (_receipts(receipts),))
        held = {(int(seq), int(claims)) for seq, claims in rows}
        live = [receipt is None or receipt in held for _, receipt in messages]
    await db.execute(_DEDUPE_SWEEP, (now, 2 * len(messages) + _SWEEP_EXTRA))
    claims = [
        [m.destination, m.id, m.dedupe] for (m, _), ok in zip(messages, live, strict=True) if ok
    ]
    rows = await db.execute_fetchall(_DEDUPE_CLAIM, (_json_encode(claims).decode(), now))
    recorded = {(destination, msg_id) for destination, msg_id in rows}
    first: list[bool] = []
    for (message, _), ok in zip(messages, live, strict=True):
        key = (message.destination, message.id)
        first.append(ok and key in recorded)
        if ok:
            recorded.discard(key)  # a second copy in the batch is not the first
    return first


def _insert_row(message: OutgoingMessage, now: float) -> tuple[Any, ...]:
    visible_at = (message.published_at or now) + message.delay
    return (
        message.id,
        message.body,
        message.key,
        message.published_at,
        visible_at,
        message.type,
        message.destination,
    )


def _receipts(receipts: Iterable[tuple[int, int]]) -> str:
    return _json_encode(list(receipts)).decode()


def _record(row: Sequence[Any]) -> DeadLetterRecord:
    return dead_letter_from_row(row)


def _record_number(record_id: str) -> int | None:
    try:
        return int(record_id)
    except ValueError:
        return None


async def _has_added(db: aiosqlite.Connection) -> bool:
    """Whether the tables and indexes of ``_ADDED`` are all there."""
    [(count,)] = await db.execute_fetchall(
        "SELECT count(*) FROM sqlite_master WHERE name IN (SELECT value FROM json_each(?))",
        (json.dumps(_ADDED_NAMES),),
    )
    return int(count) == len(_ADDED_NAMES)


async def _user_version(db: aiosqlite.Connection) -> int:
    [(version,)] = await db.execute_fetchall("PRAGMA user_version")
    return int(version)


def _database_path(url: str, described: str) -> str:
    """The file a ``sqlite://`` URL names: one ``/`` after ``//`` starts a relative path."""
    parts = urlsplit(url)
    if parts.hostname:
        raise ConfigurationError(
            f"broker URL {described!r} names a host; a SQLite broker is a local file: "
            "sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    path = unquote(parts.path)
    path = path[1:] if path.startswith("/") else path
    if not path:
        raise ConfigurationError(
            f"broker URL {described!r} names no file; write it like sqlite:///eventfn.db"
        )
    return path if path == ":memory:" else str(Path(path).absolute())
