"""arq (https://github.com/python-arq/arq) on Redis, for ``benchmarks/peers/run.py``.

- publish: ``ArqRedis.enqueue_job("handle", body, _job_id=f"{key}:{i}")`` on a pool whose
  ``default_queue_name`` is ``key``, 64 at a time (each is arq's WATCH/MULTI transaction: a job
  key plus a sorted-set entry).
- consume: ``arq.worker.Worker`` run in this process (``async_run``), ``max_jobs=concurrency``,
  ``poll_delay=0.01`` s (arq's default, 0.5 s, waits that long between polls once ``max_jobs``
  jobs are running, so it caps a drain at ~max_jobs per 0.5 s), ``keep_result=0`` (no result
  stored), ``max_tries`` at its default (5), ``log_results=False`` and the ``arq`` loggers at
  WARNING (arq logs two INFO lines per job). The clock starts in ``on_startup``, which arq calls
  right before its first poll. Stop: no more picks, the running jobs finish, then
  ``Worker.close()``.

arq 0.28.0 declares ``redis<6``; it runs here on the redis-py 8.1 that taskiq-redis needs
(installed with ``--no-deps``: see requirements.txt).

The queue is the sorted set ``key``; a job's keys are ``arq:{job,in-progress,retry,result}:`` +
its id, and the id starts with ``key:``, so one case never sees another's jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker, func

from benchmarks.peers._common import Done, body, handle_noop, handle_sleep

TOOL = "arq"
BROKERS = ("redis",)
POLL_DELAY = 0.01  # seconds between polls of the queue; arq's default is 0.5
PUBLISHERS = 64  # enqueue_job calls in flight while publishing

HANDLERS = {"noop": handle_noop, "sleep": handle_sleep}
done: Done | None = None
chosen = handle_noop


def settings(handler: str, concurrency: int) -> str:
    return (
        f"Worker(max_jobs={concurrency}, poll_delay={POLL_DELAY}, queue_read_limit=default "
        f"{max(concurrency * 5, 100)}, keep_result=0, max_tries=5 default, log_results=False); "
        "pickle; arq loggers at WARNING (per-job INFO lines off)"
    )


async def handle(ctx: dict[str, Any], message: dict[str, Any]) -> None:
    assert done is not None
    await chosen(done, message["n"], message["t"])


def publish(broker: str, url: str, key: str, n: int) -> None:
    asyncio.run(_publish(url, key, n))


async def _publish(url: str, key: str, n: int) -> None:
    pool: ArqRedis = await create_pool(RedisSettings.from_dsn(url), default_queue_name=key)
    try:
        gate = asyncio.Semaphore(PUBLISHERS)

        async def one(number: int) -> None:
            async with gate:
                job = await pool.enqueue_job("handle", body(number), _job_id=f"{key}:{number}")
                if job is None:
                    raise RuntimeError(f"arq refused job {key}:{number} (id taken)")

        for start in range(0, n, 1000):
            await asyncio.gather(*(one(i) for i in range(start, min(n, start + 1000))))
    finally:
        await pool.aclose(close_connection_pool=True)


def consume(
    broker: str, url: str, key: str, n: int, handler: str, concurrency: int, done_: Done
) -> None:
    global done, chosen
    done, chosen = done_, HANDLERS[handler]
    logging.getLogger("arq").setLevel(logging.WARNING)
    asyncio.run(_consume(url, key, concurrency, done_))


async def _consume(url: str, key: str, concurrency: int, done_: Done) -> None:
    async def started(ctx: dict[str, Any]) -> None:
        done_.start()

    worker = Worker(
        functions=[func(handle, name="handle")],
        queue_name=key,
        redis_settings=RedisSettings.from_dsn(url),
        max_jobs=concurrency,
        poll_delay=POLL_DELAY,
        keep_result=0,
        log_results=False,
        handle_signals=False,
        on_startup=started,
    )
    main = asyncio.create_task(worker.async_run())
    waiting = asyncio.create_task(done_.wait())
    await asyncio.wait({main, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if main.done():  # the worker died: report why
        waiting.cancel()
        main.result()
        raise RuntimeError("arq worker stopped before every message was handled")
    await waiting
    worker.allow_pick_jobs = False  # what arq's own graceful-stop signal handler does
    running = [task for task in worker.tasks.values() if not task.done()]
    while running:  # the jobs still running finish (and are removed from the queue)
        await asyncio.wait(running)
        running = [task for task in worker.tasks.values() if not task.done()]
    await worker.close()  # cancels the poll loop, deletes its health-check key, closes the pool
    for _ in range(40):  # redis-py 8.1 can lose a cancellation that lands in a command: repeat
        finished, _ = await asyncio.wait({main}, timeout=0.5)
        if finished:
            break
        main.cancel()
    else:
        raise RuntimeError("arq worker did not stop")
    with contextlib.suppress(asyncio.CancelledError):
        await main


def _glob(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def leftover(broker: str, url: str, key: str) -> int:
    """Jobs still queued or running (arq keeps a job in the queue until it finishes)."""
    import redis

    with redis.Redis.from_url(url) as client:
        pending = int(client.zcard(key))
        doomed = [key, f"{key}:health-check"]
        for prefix in ("job", "in-progress", "retry", "result"):
            doomed += client.scan_iter(match=f"arq:{prefix}:{_glob(key)}:*", count=1000)
        for start in range(0, len(doomed), 1000):
            client.delete(*doomed[start : start + 1000])
    return pending
