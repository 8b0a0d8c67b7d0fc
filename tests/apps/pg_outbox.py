"""A test app for the PostgreSQL outbox: each job inserts a row and emits an event in one
transaction with its ack (``eventfn_postgresql.transaction``).

``PG_OUTBOX_TABLE`` names the (schema-qualified) table of rows: ``n``, ``attempt``, ``pid``, with
no unique constraint, so that a duplicate effect shows as a second row. The emitted event goes
to the queue ``pg_audit`` (declared by the test; no handler here consumes it).
``HANDLER_SLEEP`` keeps each transaction open that long, so that a SIGKILL finds some open.
"""

from __future__ import annotations

import os

import anyio
import eventfn_postgresql
import msgspec

import eventfn

TABLE = os.environ.get("PG_OUTBOX_TABLE", "outbox_rows")
SLEEP = float(os.environ.get("HANDLER_SLEEP", "0"))
JOBS = "pg_jobs"
AUDIT = "pg_audit"

app = eventfn.App("pg-outbox", retry=eventfn.Retry(attempts=5, backoff=0.05, cap=0.2))


class Job(msgspec.Struct, frozen=True):
    n: int


@app.on_queue(JOBS)
async def work(job: Job, ctx: eventfn.Context) -> None:
    async with eventfn_postgresql.transaction(ctx) as conn:
        await conn.execute(
            f"INSERT INTO {TABLE} (n, attempt, pid) VALUES ($1, $2, $3)",
            job.n,
            ctx.attempt,
            os.getpid(),
        )
        await ctx.publish(AUDIT, {"n": job.n})
        if SLEEP:
            await anyio.sleep(SLEEP)
