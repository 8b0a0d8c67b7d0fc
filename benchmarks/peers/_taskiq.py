"""Taskiq (https://github.com/taskiq-python/taskiq) with taskiq-redis, for ``run.py``.

- broker: ``taskiq_redis.RedisStreamBroker(url, queue_name=key)``: a Redis stream read with
  ``XREADGROUP`` by a consumer group (defaults: ``xread_count=100`` per read,
  ``xread_block=2000`` ms, unacked messages reclaimed with ``XAUTOCLAIM`` after 10 min), acked
  with ``XACK`` when the task has run (``AcknowledgeType.WHEN_EXECUTED``), as eventfn acks. No
  result backend (taskiq's default ``DummyResultBackend`` stores nothing). No retry middleware
  (taskiq retries nothing by default; an unacked message is redelivered by ``XAUTOCLAIM``).
- publish: ``await broker.startup()`` (creates the consumer group at ``$`` on the empty stream),
  then ``handle.kiq(body)`` per message, in chunks of 1,000 handed to ``asyncio.gather``.
- consume: what ``taskiq worker`` does in each of its worker processes, here in this process:
  ``Receiver(broker, executor, max_async_tasks=concurrency, max_prefetch=0,
  ack_type=WHEN_EXECUTED).listen(finish_event)``. ``max_prefetch=0`` is the CLI default: the
  receiver takes a delivery only while fewer than ``concurrency`` tasks run (the broker still
  reads 100 at a time). The ``taskiq`` loggers at WARNING (the receiver logs an INFO line per
  task; ``taskiq worker`` runs at INFO by default). The clock starts after ``broker.startup()``,
  right before ``listen``. Stop: ``finish_event`` set, the receiver waits for its running tasks
  (each acked), then ``broker.shutdown()`` (see ``_stopped`` for a hang worked around there).

Keys: the stream ``key`` (its group ``taskiq`` inside) and, while a read reclaims, the lock
``autoclaim:taskiq:{key}``.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from taskiq import AsyncTaskiqDecoratedTask
from taskiq.acks import AcknowledgeType
from taskiq.receiver import Receiver
from taskiq_redis import RedisStreamBroker

from benchmarks.peers._common import Done, body, handle_noop, handle_sleep

TOOL = "taskiq"
BROKERS = ("redis",)
GROUP = "taskiq"  # RedisStreamBroker's default consumer group
CHUNK = 1000  # kiq calls handed to asyncio.gather at once while publishing

HANDLERS = {"noop": handle_noop, "sleep": handle_sleep}
done: Done | None = None
chosen = handle_noop


def settings(handler: str, concurrency: int) -> str:
    return (
        f"RedisStreamBroker (xread_count=100, xread_block=2000 ms defaults) + Receiver("
        f"max_async_tasks={concurrency}, max_prefetch=0 default, ack_type=WHEN_EXECUTED), "
        "in-process like one `taskiq worker` process; no result backend, no retry middleware "
        "(defaults); json; taskiq loggers at WARNING (per-task INFO lines off)"
    )


def _broker(url: str, key: str) -> tuple[RedisStreamBroker, AsyncTaskiqDecoratedTask[Any, Any]]:
    broker = RedisStreamBroker(url, queue_name=key, consumer_group_name=GROUP)

    async def handle(message: dict[str, Any]) -> None:
        assert done is not None
        await chosen(done, message["n"], message["t"])

    return broker, broker.register_task(handle, task_name="handle")


def publish(broker: str, url: str, key: str, n: int) -> None:
    asyncio.run(_publish(url, key, n))


async def _publish(url: str, key: str, n: int) -> None:
    tq, handle = _broker(url, key)
    await tq.startup()
    try:
        for start in range(0, n, CHUNK):
            numbers = range(start, min(n, start + CHUNK))
            await asyncio.gather(*(handle.kiq(body(i)) for i in numbers))
    finally:
        await tq.shutdown()


def consume(
    broker: str, url: str, key: str, n: int, handler: str, concurrency: int, done_: Done
) -> None:
    global done, chosen
    done, chosen = done_, HANDLERS[handler]
    logging.getLogger("taskiq").setLevel(logging.WARNING)
    asyncio.run(_consume(url, key, concurrency, done_))


async def _consume(url: str, key: str, concurrency: int, done_: Done) -> None:
    tq, _ = _broker(url, key)
    tq.is_worker_process = True
    finish = asyncio.Event()
    with ThreadPoolExecutor() as executor:  # as `taskiq worker` (for sync tasks; none here)
        receiver = Receiver(
            broker=tq,
            executor=executor,
            max_async_tasks=concurrency,
            max_prefetch=0,
            ack_type=AcknowledgeType.WHEN_EXECUTED,
            run_startup=False,
        )
        await tq.startup()
        try:
            done_.start()
            main = asyncio.create_task(receiver.listen(finish))
            waiting = asyncio.create_task(done_.wait())
            await asyncio.wait({main, waiting}, return_when=asyncio.FIRST_COMPLETED)
            if main.done():  # the receiver died: report why
                waiting.cancel()
                main.result()
                raise RuntimeError("taskiq receiver stopped before every message was handled")
            await waiting
            finish.set()  # stop reading; listen() returns once the running tasks are done
            await _stopped(main)
        finally:
            await tq.shutdown()


async def _stopped(main: asyncio.Task[None]) -> None:
    """Wait for ``Receiver.listen`` to return after its finish event.

    On stop the receiver cancels its pending ``anext(broker.listen())``, an ``XREADGROUP BLOCK``
    in flight. redis-py 8.1 sometimes loses that cancellation (the command returns normally),
    and the stream broker's read loop then goes on forever: ``listen`` never returns (so would
    ``taskiq worker`` on SIGTERM). Cancel that read again until it takes."""
    for _ in range(40):
        finished, _ = await asyncio.wait({main}, timeout=0.5)
        if finished:
            main.result()
            return
        for task in asyncio.all_tasks():
            if type(task.get_coro()).__name__ == "async_generator_asend":
                task.cancel()
    raise RuntimeError("taskiq receiver did not stop")


def leftover(broker: str, url: str, key: str) -> int:
    """Messages not acked by the group: delivered but unacked, plus never delivered."""
    import redis

    with redis.Redis.from_url(url) as client:
        pending = 0
        if client.exists(key):
            for group in client.xinfo_groups(key):
                lag = group.get("lag")
                if lag is None:  # Redis could not tell: count what the stream still holds
                    lag = int(client.xlen(key))
                pending += int(group["pending"]) + int(lag)
        client.delete(key, f"autoclaim:{GROUP}:{key}")
    return pending
