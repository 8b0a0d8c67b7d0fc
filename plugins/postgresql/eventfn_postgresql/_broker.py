"""``postgresql://``: the broker in a PostgreSQL database, one schema per namespace.

Several runners on one database are competing consumers: a claim leases rows with ``FOR UPDATE
SKIP LOCKED``, so claimers never wait on each other. Fetches wait on ``LISTEN/NOTIFY`` (see
:mod:`eventfn_postgresql._wake`); the schema and statements are in :mod:`eventfn_postgresql._sql`.

Round trips: a fetch that finds work, a publish, a settle batch (whatever its outcomes and
emitted messages), an extend, a replay: one statement each, so one round trip, atomic without
BEGIN/COMMIT. A fetch that finds nothing asks once more for the next due time, then waits.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.lowlevel
import asyncpg

from eventfn.brokers.base import (
    Broker,
    Clock,
    DeadLetterRecord,
    Delivery,
    OutgoingMessage,
    Settlement,
    SubscriptionRef,
    SubscriptionStats,
    dead_letter_from_row,
)
from eventfn.exceptions import ConfigurationError, UnknownDestination
from eventfn_postgresql._database import Connection, Database
from eventfn_postgresql._plan import SettlePlan, messages
from eventfn_postgresql._receipt import Receipt
from eventfn_postgresql._sql import Statements
from eventfn_postgresql._url import parse_url
from eventfn_postgresql._wake import Listener

# How often a fetch polls while it cannot LISTEN.
_POLL_UNLISTENED = 0.1


class PostgresBroker(Broker):
    """Broker in a PostgreSQL database: ``postgresql://user:pw@host:5432/db?namespace=shop``.

    ``namespace`` (default ``eventfn``) is the schema that holds every table of this broker.
    Other eventfn parameters: ``pool_size`` (broker connections, default 4), ``outbox_pool``
    (connections for :func:`eventfn_postgresql.transaction`, default 10) and ``poll`` (longest
    pause of a waiting fetch between checks, default 2 s); the rest go to asyncpg.

    >>> broker = PostgresBroker("postgresql://127.0.0.1:5432/app?namespace=shop")
    """

    scheme = "postgresql"

    def __init__(self, url: str, *, clock: Clock = time.time) -> None:
        super().__init__(url, clock=clock)
        self.settings = parse_url(url, self.describe())
        self.namespace = self.settings.namespace
        self.sql = Statements(self.namespace)
        self._db = Database(self.settings, self.sql, self.describe())
        self._listener = Listener(
            self.settings.dsn, self.settings.server_settings, self.sql.channel, self.describe
        )
        self._subscriptions: dict[str, int] = {}
        self._destinations: set[str] = set()

    # -- connections --------------------------------------------------------------------------

    async def connect(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._listener.close()
        await self._db.close()

    async def drop(self) -> None:
        schema = self.sql.schema
        await self._db.call(
            "cannot drop the namespace",
            lambda c: c.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE"),
        )
        self._subscriptions.clear()
        self._destinations.clear()

    # -- subscriptions ------------------------------------------------------------------------

    async def declare(self, subscriptions: Sequence[SubscriptionRef]) -> None:
        async def declare_all(connection: Connection) -> dict[str, int]:
            declared: dict[str, int] = {}
            async with connection.transaction():
                for ref in subscriptions:
                    declared[ref.name] = await self._declare(connection, ref)
            return declared

        declared = await self._db.call("cannot declare subscriptions", declare_all)
        # Only once committed: a rolled-back declaration must not look known.
        self._subscriptions.update(declared)
        self._destinations.update(ref.destination for ref in subscriptions)

    async def _declare(self, connection: Connection, ref: SubscriptionRef) -> int:
        await connection.execute(self.sql.declare_destination, ref.destination, ref.kind)
        kind = await connection.fetchval(self.sql.destination_kind, ref.destination)
        if kind != ref.kind:
            raise ConfigurationError(
                f"destination {ref.destination!r} is a {kind} on this broker, "
                f"not a {ref.kind}; use another name or the same kind everywhere"
            )
        types = None if ref.types is None else list(ref.types)
        row = await connection.fetchrow(
            self.sql.declare_subscription, ref.name, ref.destination, ref.kind, ref.group, types
        )
        assert row is not None
        if row[1] != ref.destination:
            raise ConfigurationError(
                f"subscription name {ref.name!r} is already used by destination {row[1]!r}; "
                "rename the destination or the group"
            )
        return int(row[0])

    async def _sub_id(self, name: str) -> int:
        sub_id = self._subscriptions.get(name)
        if sub_id is None:
            # Declared by another process, or never.
            found = await self._db.call(
                "cannot look up a subscription",
                lambda c: c.fetchval(self.sql.subscription_id, name),
            )
            if found is None:
                raise ConfigurationError(f"subscription {name!r} was never declared")
            sub_id = self._subscriptions[name] = int(found)
        return sub_id

    async def _check_destinations(self, names: set[str]) -> None:
        """Raise ``UnknownDestination`` unless something has declared each of ``names``."""
        unknown = names - self._destinations
        if not unknown:
            return
        rows = await self._db.call(
            "cannot look up destinations",
            lambda c: c.fetch(self.sql.known_destinations, sorted(unknown)),
        )
        self._destinations.update(row[0] for row in rows)
        missing = sorted(names - self._destinations)
        if missing:
            raise UnknownDestination(
                f"nothing has declared destination {missing[0]!r} on {self.describe()}; "
                "start a runner of an app that subscribes to it (or call app.declare()) first"
            )

    # -- publishing ---------------------------------------------------------------------------

    async def publish(self, batch: Sequence[OutgoingMessage]) -> None:
        if not batch:
            await anyio.lowlevel.checkpoint()
            return
        now = self.clock()
        found = messages(batch, now)
        await self._check_destinations(found.destinations)
        sql, arguments = self.sql.publish, list[Any](found.arrays)
        if found.deduped:
            sql, arguments = self.sql.publish_deduped, [*found.arrays, found.windows, now]
        with anyio.CancelScope(shield=True):
            woken = await self._db.call("cannot publish", lambda c: c.fetchval(sql, *arguments))
        self._listener.wake(woken)

    # -- consuming ----------------------------------------------------------------------------

    async def fetch(
        self, subscription: SubscriptionRef, limit: int, *, lease: float, wait: float = 0.0
    ) -> list[Delivery]:
        sub_id = await self._sub_id(subscription.name)
        waker = self._listener.waker(sub_id)
        deadline = anyio.current_time() + wait
        while True:
            listening = wait > 0 and await self._listener.ensure()
            changed = waker.current()
            found = await self._claim(sub_id, subscription.name, limit, lease)
            remaining = deadline - anyio.current_time()
            if found or limit <= 0 or remaining <= 0:
                return found
            pause = await self._pause(sub_id, remaining, listening)
            waker.waiting += 1
            try:
                with anyio.move_on_after(pause):
                    await changed.wait()
            finally:
                waker.waiting -= 1

    async def _pause(self, sub_id: int, remaining: float, listening: bool) -> float:
        """How long to wait for a notification: until the next due time this fetch can see
        (a delayed message, a lease that runs out), at most ``poll``, fast when not listening."""
        pause = min(remaining, self.settings.poll if listening else _POLL_UNLISTENED)
        now = self.clock()
        due = await self._db.call(
            "cannot fetch", lambda c: c.fetchval(self.sql.next_due, sub_id, now)
        )
        if due is not None:
            pause = min(pause, max(0.0, due - now))
        return pause

    async def _claim(self, sub_id: int, name: str, limit: int, lease: float) -> list[Delivery]:
        if limit <= 0:
            await anyio.lowlevel.checkpoint()
            return []
        now = self.clock()
        # The claim runs to its end even if the caller is cancelled: the rows are leased then,
        # and are given back below rather than left hidden for a lease with an attempt counted.
        with anyio.CancelScope(shield=True):
            rows = await self._db.call(
                "cannot fetch",
                lambda c: c.fetch(self.sql.claim, sub_id, now, now + lease, limit),
            )
        found = [
            Delivery(
                subscription=name,
                id=msg_id,
                body=body,
                attempt=attempts,
                receipt=Receipt(self, seq, claims),
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
        plan = SettlePlan(settlements, self.clock())
        if plan.emitted.destinations:
            await self._check_destinations(plan.emitted.destinations)
        sql, arguments = self.sql.settle(plan.shape), plan.arguments()
        with anyio.CancelScope(shield=True):
            row = await self._db.call("cannot settle", lambda c: c.fetchrow(sql, *arguments))
        assert row is not None
        self._listener.wake(row[1])

    async def extend(self, deliveries: Sequence[Delivery], lease: float) -> None:
        if not deliveries:
            await anyio.lowlevel.checkpoint()
            return
        receipts: list[Receipt] = [d.receipt for d in deliveries]
        seqs, claims = [r.seq for r in receipts], [r.claims for r in receipts]
        until = self.clock() + lease
        with anyio.CancelScope(shield=True):
            await self._db.call(
                "cannot extend leases", lambda c: c.execute(self.sql.extend, seqs, claims, until)
            )

    async def stats(self, subscription: SubscriptionRef) -> SubscriptionStats:
        sub_id = await self._sub_id(subscription.name)
        now = self.clock()
        row = await self._db.call(
            "cannot count messages", lambda c: c.fetchrow(self.sql.stats, sub_id, now)
        )
        assert row is not None
        ready, delayed, in_flight, dead = row
        return SubscriptionStats(
            subscription=subscription.name,
            ready=ready,
            delayed=delayed,
            in_flight=in_flight,
            dead=dead,
        )

    # -- the outbox (see eventfn_postgresql.transaction) -----------------------------------------

    async def _hold(self, connection: Connection, receipt: Receipt) -> bool:
        """Lock a delivery's row in ``connection``'s transaction if its lease is still held;
        claimers and extensions skip a locked row, so the lease cannot be taken over now."""
        with self._db.errors("cannot lock the delivery"):
            found = await connection.fetchval(self.sql.lock_delivery, receipt.seq, receipt.claims)
        return found is not None

    async def _ack_in(
        self, connection: Connection, delivery: Delivery, emitted: Sequence[OutgoingMessage]
    ) -> list[int] | None:
        """Ack ``delivery`` with ``emitted`` in ``connection``'s transaction; the subscriptions
        to wake once it commits, or None if the delivery was not held (nothing was done)."""
        ack = Settlement(delivery=delivery, outcome="ack", emitted=tuple(emitted))
        plan = SettlePlan([ack], self.clock())
        if plan.emitted.destinations:
            await self._check_destinations(plan.emitted.destinations)
        with self._db.errors("cannot ack in the transaction"):
            row = await connection.fetchrow(self.sql.settle(plan.shape), *plan.arguments())
        assert row is not None
        return None if row[0] != 1 else list(row[1] or ())

    def _wake(self, subscription_ids: Sequence[int]) -> None:
        self._listener.wake(subscription_ids)

    # -- dead letters -------------------------------------------------------------------------

    async def dead_letters(
        self, subscription: str | None = None, *, limit: int = 100, after: str | None = None
    ) -> list[DeadLetterRecord]:
        sub_id = None if subscription is None else await self._sub_id(subscription)
        start = 0 if after is None else int(after)
        rows = await self._db.call(
            "cannot list dead letters",
            lambda c: c.fetch(self.sql.dead_letters, sub_id, start, limit),
        )
        return [_record(row) for row in rows]

    async def dead_letter(self, record_id: str) -> DeadLetterRecord | None:
        number = _record_number(record_id)
        if number is None:
            await anyio.lowlevel.checkpoint()
            return None
        row = await self._db.call(
            "cannot read a dead letter", lambda c: c.fetchrow(self.sql.dead_letter, number)
        )
        return None if row is None else _record(row)

    async def replay(self, record_ids: Sequence[str]) -> int:
        wanted = sorted({n for n in map(_record_number, record_ids) if n is not None})
        if not wanted:
            await anyio.lowlevel.checkpoint()
            return 0
        now = self.clock()
        with anyio.CancelScope(shield=True):
            row = await self._db.call(
                "cannot replay dead letters", lambda c: c.fetchrow(self.sql.replay, wanted, now)
            )
        assert row is not None
        self._listener.wake(row[1])
        return int(row[0])

    async def purge(self, subscription: str | None = None) -> int:
        if subscription is None:
            status = await self._db.call(
                "cannot purge dead letters", lambda c: c.execute(self.sql.purge_all)
            )
        else:
            sub_id = await self._sub_id(subscription)
            status = await self._db.call(
                "cannot purge dead letters", lambda c: c.execute(self.sql.purge, sub_id)
            )
        return int(status.rsplit(" ", 1)[-1])  # "DELETE <count>"


def _record(row: asyncpg.Record) -> DeadLetterRecord:
    return dead_letter_from_row(row)


def _record_number(record_id: str) -> int | None:
    try:
        number = int(record_id)
    except ValueError:
        return None
    return number if 0 < number < 2**63 else None
