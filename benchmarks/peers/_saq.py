"""SAQ (https://github.com/tobymao/saq) on Redis, for ``benchmarks/peers/run.py``.

- publish: ``Queue.enqueue("handle", message=body, key=f"{key}:{i}", ttl=-1)`` on a
  ``RedisQueue`` named ``key``, in chunks of 1,000 handed to ``asyncio.gather`` (SAQ itself keeps
  at most ``max_concurrent_ops`` = 20 enqueue scripts in flight).
- consume: ``saq.Worker(queue, functions, concurrency=concurrency)`` started in this process:
  ``concurrency`` tasks each blocking on ``BLMOVE queued -> active`` (``dequeue_timeout=0``, SAQ's
  default: block until a job comes, no re-polling), default timers (schedule/abort 1 s, sweep
  60 s, worker info 10 s). Job ``ttl=-1``: the job hash is deleted when it finishes, no result
  kept (default 600 s). ``retries`` at SAQ's default (1 attempt, no retry). The ``saq`` logger at
  WARNING (it logs an INFO line per job enqueued and per job processed). The clock starts in the
  worker's ``startup`` hook, right before its dequeue tasks start. Stop: once the last jobs have
  finished (the ``active`` list is empty), ``Worker.stop()``.

Every key SAQ makes is ``saq:{key}:...``, ``saq:job:{key}:...`` or ``saq:abort:{key}:...`` (the
job keys start with ``key:``).

Seen at worker start: SAQ's first ``sweep`` (run at once, then every 60 s) reads the ``active``
list while the dequeue tasks are filling it, finds a job just moved there whose status still says
``queued``, and "sweeps" it (marks it aborting, 5 s abort key) although its dequeue task goes on
to run it; with ``ttl=-1`` the sweep then logs "Upkeep task failed unexpectedly ... doesn't exist"
because the job finished and was deleted. Every job is still handled once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from saq import Queue, Worker

from benchmarks.peers._common import Done, body, handle_noop, handle_sleep

TOOL = "saq"
BROKERS = ("redis",)
CHUNK = 1000  # enqueue calls handed to asyncio.gather at once while publishing

HANDLERS = {"noop": handle_noop, "sleep": handle_sleep}
done: Done | None = None
chosen = handle_noop


def settings(handler: str, concurrency: int) -> str:
    return (
        f"Worker(concurrency={concurrency}, dequeue_timeout=0 default: BLMOVE blocks), "
        "default timers; job ttl=-1 (no result kept), retries=1 default; json; "
        "saq logger at WARNING (per-job INFO lines off)"
    )


async def handle(ctx: dict[str, Any], *, message: dict[str, Any]) -> None:
    assert done is not None
    await chosen(done, message["n"], message["t"])


def publish(broker: str, url: str, key: str, n: int) -> None:
    logging.getLogger("saq").setLevel(logging.WARNING)
    asyncio.run(_publish(url, key, n))


async def _publish(url: str, key: str, n: int) -> None:
    queue = Queue.from_url(url, name=key)
    await queue.connect()
    try:
        for start in range(0, n, CHUNK):
            jobs = await asyncio.gather(
                *(
                    queue.enqueue("handle", message=body(i), key=f"{key}:{i}", ttl=-1)
                    for i in range(start, min(n, start + CHUNK))
                )
            )
            if not all(jobs):
                raise RuntimeError("SAQ refused a job (key taken)")
    finally:
        await queue.disconnect()


def consume(
    broker: str, url: str, key: str, n: int, handler: str, concurrency: int, done_: Done
) -> None:
    global done, chosen
    done, chosen = done_, HANDLERS[handler]
    logging.getLogger("saq").setLevel(logging.WARNING)
    asyncio.run(_consume(url, key, concurrency, done_))


async def _consume(url: str, key: str, concurrency: int, done_: Done) -> None:
    queue = Queue.from_url(url, name=key)
    await queue.connect()

    async def started(ctx: Any) -> None:
        done_.start()

    worker = Worker(
        queue,
        functions=[("handle", handle)],
        concurrency=concurrency,
        startup=started,
    )
    try:
        main = asyncio.create_task(worker.start())
        waiting = asyncio.create_task(done_.wait())
        await asyncio.wait({main, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if main.done():  # the worker died: report why
            waiting.cancel()
            main.result()
            raise RuntimeError("SAQ worker stopped before every message was handled")
        await waiting
        # Every job has been dequeued; the last ones finish (leave the active list), then stop:
        # the dequeue tasks, all blocked on an empty queue, are cancelled by Worker.stop().
        # (Polled, not timed: SAQ has no "idle" event.)
        while worker.job_task_contexts or await queue.count("active"):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await worker.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await main
    finally:
        await queue.disconnect()


def _glob(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def leftover(broker: str, url: str, key: str) -> int:
    """Jobs not finished: SAQ keeps every job in ``saq:{key}:incomplete`` until it finishes."""
    import redis

    with redis.Redis.from_url(url) as client:
        pending = max(
            int(client.zcard(f"saq:{key}:incomplete")),
            int(client.llen(f"saq:{key}:queued")) + int(client.llen(f"saq:{key}:active")),
        )
        doomed: list[Any] = []
        for kind in ("", "job:", "abort:"):
            prefix = f"saq:{kind}{_glob(key)}:*"
            doomed += client.scan_iter(match=prefix, count=1000)
        for start in range(0, len(doomed), 1000):
            client.delete(*doomed[start : start + 1000])
    return pending
