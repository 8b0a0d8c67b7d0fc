"""The transactional outbox: a handler's own writes, its ack and its emitted events commit in
one PostgreSQL transaction, or none of them does.

::

    @app.on_queue("orders")
    async def store(order: Order, ctx: eventfn.Context) -> None:
        async with eventfn_postgresql.transaction(ctx) as conn:
            await conn.execute("INSERT INTO shop.orders (id) VALUES ($1)", order.id)
            await ctx.emit(OrderStored(order_id=order.id))

On entering, the delivery's row is locked (``SELECT ... FOR UPDATE``) if its lease is still
held; from then on no other runner can take the lease over (claims skip locked rows). On a
clean exit, in that same transaction, the delivery is deleted (the ack, fenced by its receipt)
and the events emitted so far are inserted; then it commits. The runner's own ack afterwards
finds nothing to settle and changes nothing, and so does its retry if the handler fails later.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from types import TracebackType
from typing import Any, SupportsIndex

import anyio
import asyncpg
from asyncpg.pool import PoolConnectionProxy
from asyncpg.transaction import Transaction as PgTransaction

from eventfn.brokers.base import OutgoingMessage
from eventfn.context import Context
from eventfn.exceptions import BrokerError, ConfigurationError
from eventfn_postgresql._database import Connection
from eventfn_postgresql._receipt import Receipt

log = logging.getLogger("eventfn.postgresql")


class LeaseLost(BrokerError):
    """The delivery is no longer this runner's: its lease ran out and another runner took it
    over (or it was settled already). Nothing of the transaction was committed, and the other
    runner's delivery stands; the runner's settle of this one will be ignored."""


class OutboxClosed(ConfigurationError):
    """An event was emitted after :func:`transaction` had acked the message: it would never be
    published. Emit inside the ``async with`` block."""


def transaction(ctx: Context[Any], *, connection: Connection | None = None) -> Transaction:
    """Your writes, the message's ack and the events it emitted, in one transaction.

    ``ctx`` is the handler's :class:`eventfn.Context`. The block gets an asyncpg connection in a
    transaction on the broker's database, from a pool of the broker's (``outbox_pool`` in the
    URL sets its size), or ``connection`` (one of yours, to the same database, not in a
    transaction already).

    >>> async with eventfn_postgresql.transaction(ctx) as conn:
    ...     await conn.execute("UPDATE stock SET count = count - 1 WHERE sku = $1", sku)
    ...     await ctx.emit(StockReserved(sku=sku))

    Raises :class:`LeaseLost` (on entry, or on exit after rolling back) if the delivery's lease
    was taken over by another runner.
    """
    return Transaction(ctx, connection)


class Transaction:
    """The async context manager that :func:`transaction` returns (one use)."""

    def __init__(self, ctx: Context[Any], connection: Connection | None) -> None:
        receipt = ctx.delivery.receipt
        if not isinstance(receipt, Receipt):
            raise ConfigurationError(
                "eventfn_postgresql.transaction(ctx) needs a message delivered by the postgresql "
                f"broker; this one came from another broker (receipt {receipt!r})"
            )
        if receipt.settled:
            raise OutboxClosed(
                f"message {ctx.delivery.id} was already acked by an earlier "
                "eventfn_postgresql.transaction(ctx); use one transaction per message"
            )
        self.ctx = ctx
        self.receipt = receipt
        self.broker = receipt.broker
        self._given = connection
        self._connection: Connection | None = None
        self._acquired: PoolConnectionProxy[asyncpg.Record] | None = None
        self._transaction: PgTransaction | None = None

    async def __aenter__(self) -> Connection:
        if self._given is not None and self._given.is_in_transaction():
            raise ConfigurationError(
                "the connection given to eventfn_postgresql.transaction() is in a transaction "
                "already; give one that is not (the outbox commits its own transaction)"
            )
        connection = self._given or await self._acquire()
        self._connection = connection
        try:
            with self.broker._db.errors("cannot start the outbox transaction"):
                self._transaction = connection.transaction()
                await self._transaction.start()
            if not await self.broker._hold(connection, self.receipt):
                raise self._lost()
        except BaseException:
            await self._end()
            raise
        return connection

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            await self._end()  # rolled back: the message is settled by the handler's outcome
            return
        try:
            woken = await self._commit()
        finally:
            await self._end()
        self.receipt.settled = True
        # Emitted events are in the database now; the runner must not publish them again, and
        # one emitted from here on could never be published with this message's ack.
        self.ctx.emitted = _Sealed(self.ctx.delivery.id)
        self.broker._wake(woken)

    async def _acquire(self) -> Connection:
        pool = await self.broker._db.outbox()
        with self.broker._db.errors("cannot connect for the outbox transaction"):
            self._acquired = await pool.acquire()
        return self._acquired

    async def _commit(self) -> list[int]:
        assert self._connection is not None and self._transaction is not None
        # Shielded: once the ack is sent, the transaction is either committed or rolled back
        # by us, never left to a cancellation halfway.
        woken: list[int] | None = None
        with anyio.CancelScope(shield=True):
            woken = await self.broker._ack_in(self._connection, self.ctx.delivery, self.ctx.emitted)
            if woken is not None:
                with self.broker._db.errors("cannot commit the outbox transaction"):
                    await self._transaction.commit()
        if woken is None:
            raise self._lost()
        return woken

    def _lost(self) -> LeaseLost:
        delivery = self.ctx.delivery
        return LeaseLost(
            f"the lease of message {delivery.id} on {delivery.subscription} (attempt "
            f"{delivery.attempt}) was taken over by another runner; nothing was committed"
        )

    async def _end(self) -> None:
        """Roll back if still open, and give back the connection if it is ours."""
        connection, self._connection = self._connection, None
        transaction, self._transaction = self._transaction, None
        if connection is None:
            return
        with anyio.CancelScope(shield=True):
            if transaction is not None and connection.is_in_transaction():
                try:
                    await transaction.rollback()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("outbox rollback failed: %s", type(exc).__name__)
            acquired, self._acquired = self._acquired, None
            if acquired is not None:
                pool = await self.broker._db.outbox()
                await pool.release(acquired)


class _Sealed(list[OutgoingMessage]):
    """``ctx.emitted`` after the outbox acked the message: emitting now is a mistake."""

    def __init__(self, message_id: str) -> None:
        super().__init__()
        self.message_id = message_id

    def _refuse(self) -> OutboxClosed:
        return OutboxClosed(
            f"message {self.message_id} was acked by eventfn_postgresql.transaction(ctx), so an "
            "event emitted after that block would never be published; emit inside the block"
        )

    def append(self, item: OutgoingMessage) -> None:
        raise self._refuse()

    def extend(self, items: Iterable[OutgoingMessage]) -> None:
        raise self._refuse()

    def insert(self, index: SupportsIndex, item: OutgoingMessage) -> None:
        raise self._refuse()
