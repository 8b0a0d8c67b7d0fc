"""The order-accepted fan-out: one fact on a topic, three independent reactions.

``reserve-inventory``, ``send-customer-email`` and ``update-analytics`` are three subscriber
groups of the ``order-events`` topic: each gets its own copy of every order, with its own
retries and dead letters, so a flaky e-mail provider never re-runs an inventory reservation.
Reserving inventory emits ``InventoryReserved`` on the app's event bus, which the warehouse
reacts to: the chain is visible in the runner's log and in ``eventfn inspect``.

Run it::

    eventfn run examples.orders.shop:app --broker sqlite:///shop.db
    eventfn publish order-events '{"orderId": "o1", "customerId": "c1", "units": 2}' \\
        --type order.accepted --broker sqlite:///shop.db
"""

from __future__ import annotations

import os
import sqlite3
import zlib
from pathlib import Path

import anyio
import msgspec

import eventfn

DATA = Path(os.environ.get("SHOP_DATA", "shop-data"))


class OrderAccepted(msgspec.Struct, frozen=True, rename="camel"):
    """A customer's order was accepted (CloudEvents type ``order.accepted``)."""

    order_id: str
    customer_id: str
    units: int = 1


class InventoryReserved(msgspec.Struct, frozen=True, rename="camel"):
    """Stock was set aside for an order (CloudEvents type ``inventory.reserved``)."""

    order_id: str
    units: int


app = eventfn.App("shop", retry=eventfn.Retry(attempts=4, backoff=0.2, cap=2.0))


def _store() -> sqlite3.Connection:
    DATA.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(DATA / "state.db", timeout=10)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(
        "CREATE TABLE IF NOT EXISTS effects (grp TEXT, order_id TEXT, detail TEXT, "
        "PRIMARY KEY (grp, order_id))"
    )
    return db


def _record(group: str, order_id: str, detail: str) -> None:
    with _store() as db:  # the "managed state store" each reaction writes to
        db.execute("INSERT OR REPLACE INTO effects VALUES (?, ?, ?)", (group, order_id, detail))


@app.on_topic("order-events", group="reserve-inventory", emits=[InventoryReserved])
async def reserve_inventory(order: OrderAccepted, ctx: eventfn.Context) -> None:
    await anyio.to_thread.run_sync(
        _record, "reserve-inventory", order.order_id, f"{order.units} units"
    )
    await ctx.emit(InventoryReserved(order_id=order.order_id, units=order.units))


@app.on_topic("order-events", group="send-customer-email", concurrency=16)
async def send_customer_email(order: OrderAccepted, ctx: eventfn.Context) -> None:
    # A flaky provider: one order in eight fails on its first attempt and succeeds on retry.
    if ctx.attempt == 1 and zlib.crc32(order.order_id.encode()) % 8 == 0:
        raise ConnectionError("mail provider timed out")
    await anyio.to_thread.run_sync(
        _record, "send-customer-email", order.order_id, f"mailed {order.customer_id}"
    )


@app.on_topic("order-events", group="update-analytics")
async def update_analytics(order: OrderAccepted) -> None:
    await anyio.to_thread.run_sync(_record, "update-analytics", order.order_id, "counted")


@app.on_event(InventoryReserved, group="notify-warehouse")
async def notify_warehouse(event: InventoryReserved) -> None:
    await anyio.to_thread.run_sync(
        _record, "notify-warehouse", event.order_id, f"pick {event.units}"
    )
