"""A nightly reconciliation: at 02:00 Berlin time, compare two ledgers and report every
difference as a ``MismatchFound`` domain event.

``reconcile`` runs on ``cron="0 2 * * *"`` in ``tz="Europe/Berlin"`` (02:00 local time, summer
or winter). It reads two small ledgers from ``$RECON_DATA`` (default ``recon-data/``):
``bank.json`` (what the bank booked) and ``books.json`` (what our books say), each a list of
``{"ref": ..., "amount_cents": ...}``, and emits one ``MismatchFound`` per reference that is
missing on one side or booked with another amount. The events are published only if the whole
comparison succeeds, so a run that fails half-way reports nothing and is retried.
``record_mismatch`` reacts to each event by storing it in ``$RECON_DATA/mismatches.db``, once
per night and reference (a redelivered event changes nothing).

``missed="last"``: ticks are not stored anywhere while no runner is up. A runner that starts
after 02:00 (a deploy at 01:59, a host down for the night) runs the latest missed tick once,
with ``tick.catch_up`` set, instead of waiting a whole day; ticks older than that are not
replayed, since each reconciliation looks at the ledgers as they are now. With several
runners the tick is still handled once: its message id comes from the schedule and due time.

Run it (it then waits for 02:00; ``--burst`` does not run schedules)::

    eventfn run examples.reconciliation.nightly:app --broker sqlite:///recon.db

To reconcile now, publish a tick by hand while a runner is up (or before ``--burst``)::

    eventfn publish schedule.nightly-reconciliation \\
        '{"schedule": "nightly-reconciliation", "due": "2026-03-10T01:00:00Z", \\
          "due_at": 1773104400}' --type eventfn.schedule.tick --broker sqlite:///recon.db
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path

import anyio
import msgspec

import eventfn


class Entry(msgspec.Struct, frozen=True):
    """One booking in a ledger."""

    ref: str
    amount_cents: int


class MismatchFound(msgspec.Struct, frozen=True):
    """The ledgers disagree on ``ref`` (CloudEvents type ``mismatch.found``); ``None`` means
    the entry is missing on that side."""

    night: str
    ref: str
    bank_cents: int | None
    books_cents: int | None


app = eventfn.App("reconciliation", retry=eventfn.Retry(attempts=3, backoff=1.0, cap=30))


def data_dir() -> Path:
    """Where the ledgers and the mismatch records are (``$RECON_DATA``)."""
    return Path(os.environ.get("RECON_DATA", "recon-data"))


def read_ledger(name: str) -> dict[str, int]:
    """A ledger file as ``{ref: amount_cents}``."""
    raw = (data_dir() / f"{name}.json").read_bytes()
    return {e.ref: e.amount_cents for e in msgspec.json.decode(raw, type=list[Entry])}


def compare(night: str, bank: dict[str, int], books: dict[str, int]) -> list[MismatchFound]:
    """Every reference on which the two ledgers differ, in reference order."""
    return [
        MismatchFound(night=night, ref=ref, bank_cents=bank.get(ref), books_cents=books.get(ref))
        for ref in sorted(bank.keys() | books.keys())
        if bank.get(ref) != books.get(ref)
    ]


@app.on_schedule(
    cron="0 2 * * *",
    tz="Europe/Berlin",
    missed="last",
    name="nightly-reconciliation",
    emits=[MismatchFound],
)
async def reconcile(tick: eventfn.Tick, ctx: eventfn.Context) -> None:
    bank = await anyio.to_thread.run_sync(read_ledger, "bank")
    books = await anyio.to_thread.run_sync(read_ledger, "books")
    mismatches = compare(tick.due, bank, books)
    late = " (catching up a missed night)" if tick.catch_up else ""
    ctx.log.info("reconciled %d references, %d mismatches%s", len(bank), len(mismatches), late)
    for mismatch in mismatches:
        await ctx.emit(mismatch)


@app.on_event(MismatchFound, group="record-mismatch")
async def record_mismatch(mismatch: MismatchFound) -> None:
    await anyio.to_thread.run_sync(store_mismatch, mismatch)


def store_mismatch(mismatch: MismatchFound) -> None:
    """Keep one row per night and reference (what an accountant would review)."""
    data_dir().mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(data_dir() / "mismatches.db", timeout=10)) as db, db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS mismatches (night TEXT, ref TEXT, bank_cents INTEGER, "
            "books_cents INTEGER, PRIMARY KEY (night, ref))"
        )
        db.execute(
            "INSERT OR IGNORE INTO mismatches VALUES (?, ?, ?, ?)",
            (mismatch.night, mismatch.ref, mismatch.bank_cents, mismatch.books_cents),
        )
