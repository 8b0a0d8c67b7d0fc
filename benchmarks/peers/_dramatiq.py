"""Dramatiq with its RedisBroker: a thread-pool worker started in the consumer process.

- ``RedisBroker(url=..., namespace=key)``: every key of a case starts with ``key:``, so cases
  never collide and clean-up deletes ``key:*``.
- One actor ``handle(message)`` on queue ``bench`` with Dramatiq's default middleware (AgeLimit,
  TimeLimit, ShutdownNotifications, Callbacks, Pipelines, Retries: retries stay on, as in
  eventfn; nothing fails here). Its messages are acked after the actor returns (Dramatiq's
  only mode).
- ``dramatiq.Worker(broker, worker_threads=C)`` started programmatically, the same as
  ``dramatiq --threads C`` minus the process supervisor; prefetch is Dramatiq's documented
  default (``dramatiq_queue_prefetch`` unset: 2 x worker threads), and ``worker_timeout``
  stays at its default.
- The sleep handler is ``time.sleep(0.005)`` in a worker thread (Dramatiq's actors are sync;
  its AsyncIO middleware would put them on an event loop, but threads are its default model).
- Publishing: ``actor.send`` in a loop (Dramatiq has no bulk enqueue; ``group`` sends one by
  one too). Not timed.
"""

from __future__ import annotations

import logging
from typing import Any

from benchmarks.peers._common import Done, body, handle_noop_sync, handle_sleep_sync

TOOL = "dramatiq"
BROKERS = ("redis",)
QUEUE = "bench"


def settings(handler: str, concurrency: int) -> str:
    return (
        f"Worker(worker_threads={concurrency}), RedisBroker, prefetch {2 * concurrency} "
        f"(default 2 x threads), default middleware incl. Retries, ack after the actor"
    )


def _broker(url: str, key: str) -> Any:
    from dramatiq.brokers.redis import RedisBroker

    return RedisBroker(url=url, namespace=key)


def _actor(broker: Any, done: Done | None, handler: str) -> Any:
    import dramatiq

    handle = handle_noop_sync if handler == "noop" else handle_sleep_sync

    def bench(message: dict[str, Any]) -> None:
        assert done is not None
        handle(done, message["n"], message["t"])

    return dramatiq.actor(bench, broker=broker, queue_name=QUEUE, actor_name="bench")


def publish(broker: str, url: str, key: str, n: int) -> None:
    redis_broker = _broker(url, key)
    actor = _actor(redis_broker, None, "noop")
    for i in range(n):
        actor.send(body(i))
    redis_broker.close()


def consume(
    broker: str, url: str, key: str, n: int, handler: str, concurrency: int, done: Done
) -> None:
    import dramatiq

    logging.basicConfig(level=logging.WARNING)
    redis_broker = _broker(url, key)
    _actor(redis_broker, done, handler)
    worker = dramatiq.Worker(redis_broker, worker_threads=concurrency)
    done.start()
    worker.start()
    try:
        done.wait_blocking()
    finally:
        worker.stop()  # waits for the worker threads, then acks/requeues what it holds
        redis_broker.close()


def leftover(broker: str, url: str, key: str) -> int:
    """Not acked: every message still in a queue's ``.msgs`` hash (queued, delayed, or fetched
    and not acked yet), plus the dead-lettered; then delete every ``key:*`` key."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        left = client.hlen(f"{key}:{QUEUE}.msgs") + client.hlen(f"{key}:{QUEUE}.DQ.msgs")
        left += client.zcard(f"{key}:{QUEUE}.XQ")
        names = list(client.scan_iter(match=f"{key}:*"))
        if names:
            client.delete(*names)
        return left
    finally:
        client.close()
