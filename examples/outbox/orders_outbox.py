"""A transactional outbox on PostgreSQL: an order row, the stock it takes, the message's ack and
the ``OrderPlaced`` event commit in one transaction, or none of them does.

``place_order`` takes ``place-order`` commands from a queue. Inside
``eventfn_postgresql.transaction(ctx)`` it inserts the order, takes the units from ``stock``
and emits ``OrderPlaced``; if the stock goes below zero it raises ``eventfn.DeadLetter``
*after* those writes, still inside the block: the transaction rolls back, so there is no order
row, no stock taken and no event, and the command lands in the dead-letter queue. A crash
anywhere before the commit leaves nothing either, and the command is delivered again.
``confirm_order`` reacts to ``OrderPlaced`` and records a confirmation in its own outbox
transaction, so a confirmation exists exactly for the orders that were committed.

The tables live in the broker's database. The app's default broker URL sets ``search_path`` to
its namespace, so they sit beside the broker's own tables (``--broker`` or ``EVENTFN_BROKER``
choose another)::

    eventfn run examples.outbox.orders_outbox:app --burst       # creates the namespace
    psql test -c "SET search_path = orders_outbox;
        CREATE TABLE stock (sku text PRIMARY KEY, available integer NOT NULL);
        CREATE TABLE orders (id text PRIMARY KEY, sku text NOT NULL, units integer NOT NULL);
        CREATE TABLE confirmations (order_id text PRIMARY KEY);
        INSERT INTO stock VALUES ('tea', 3);"
    eventfn publish place-order '{"order_id": "o1", "sku": "tea", "units": 2}' \\
        --broker "postgresql://127.0.0.1:5432/test?namespace=orders_outbox"
    eventfn publish place-order '{"order_id": "o2", "sku": "tea", "units": 2}' \\
        --broker "postgresql://127.0.0.1:5432/test?namespace=orders_outbox"   # out of stock
    eventfn run examples.outbox.orders_outbox:app --burst
"""

from __future__ import annotations

import eventfn_postgresql
import msgspec

import eventfn


class PlaceOrder(msgspec.Struct, frozen=True):
    """A customer asks for ``units`` of ``sku``."""

    order_id: str
    sku: str
    units: int


class OrderPlaced(msgspec.Struct, frozen=True):
    """The order is stored and its stock taken (CloudEvents type ``order.placed``)."""

    order_id: str
    sku: str
    units: int


app = eventfn.App(
    "orders-outbox",
    broker="postgresql://127.0.0.1:5432/test?namespace=orders_outbox&search_path=orders_outbox",
    retry=eventfn.Retry(attempts=4, backoff=0.2, cap=2.0),
)


@app.on_queue("place-order", emits=[OrderPlaced])
async def place_order(command: PlaceOrder, ctx: eventfn.Context) -> None:
    async with eventfn_postgresql.transaction(ctx) as conn:
        await conn.execute(
            "INSERT INTO orders (id, sku, units) VALUES ($1, $2, $3)",
            command.order_id,
            command.sku,
            command.units,
        )
        left = await conn.fetchval(
            "UPDATE stock SET available = available - $2 WHERE sku = $1 RETURNING available",
            command.sku,
            command.units,
        )
        await ctx.emit(OrderPlaced(order_id=command.order_id, sku=command.sku, units=command.units))
        if left is None or left < 0:
            # Raised inside the block: the order row, the stock update and the event above
            # are rolled back together, and the command goes to the dead-letter queue.
            raise eventfn.DeadLetter(f"not enough {command.sku!r} for order {command.order_id}")


@app.on_event(OrderPlaced, group="confirm-order")
async def confirm_order(event: OrderPlaced, ctx: eventfn.Context) -> None:
    async with eventfn_postgresql.transaction(ctx) as conn:
        await conn.execute(
            "INSERT INTO confirmations (order_id) VALUES ($1) ON CONFLICT DO NOTHING",
            event.order_id,
        )
    ctx.log.info("order %s confirmed", event.order_id)
