"""A test app for the dead-letter tooling: one topic, two groups, one of which dead-letters.

Topic ``payments`` has group ``ledger``, which books every payment, and group ``notify``, which
dead-letters each payment whose ``n`` is a multiple of 3 with ``DeadLetter("customer N has no
email address")`` until the fix is deployed (``FLAKY_FIXED=1``). A payload that is not a
``Payment`` (``{"n": "oops"}``) is a poison message for both groups.

Every handler call is recorded in the SQLite file ``RECORD_DB``, table ``calls``: group, message
id, n, attempt and outcome (``ok`` or ``failed``).
"""

from __future__ import annotations

import os
import sqlite3

import anyio
import msgspec

import eventfn

RECORD_DB = os.environ.get("RECORD_DB", "records.db")


class Payment(msgspec.Struct, frozen=True):
    n: int


def setup(path: str = RECORD_DB) -> None:
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS calls (grp TEXT, id TEXT, n INT, attempt INT, outcome TEXT)"
        )


def _record(group: str, ctx: eventfn.Context, n: int, outcome: str) -> None:
    with sqlite3.connect(RECORD_DB, timeout=30) as db:
        db.execute(
            "INSERT INTO calls VALUES (?, ?, ?, ?, ?)",
            (group, ctx.message_id, n, ctx.attempt, outcome),
        )


app = eventfn.App("flaky", retry=eventfn.Retry(attempts=3, backoff=0.05, cap=0.1))


@app.on_topic("payments", group="ledger")
async def book(payment: Payment, ctx: eventfn.Context) -> None:
    await anyio.to_thread.run_sync(_record, "ledger", ctx, payment.n, "ok")


@app.on_topic("payments", group="notify")
async def notify(payment: Payment, ctx: eventfn.Context) -> None:
    if payment.n % 3 == 0 and os.environ.get("FLAKY_FIXED") != "1":
        await anyio.to_thread.run_sync(_record, "notify", ctx, payment.n, "failed")
        raise eventfn.DeadLetter(f"customer {payment.n} has no email address")
    await anyio.to_thread.run_sync(_record, "notify", ctx, payment.n, "ok")
