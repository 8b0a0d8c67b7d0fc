"""Celery with the Redis broker: a thread-pool worker started in the consumer process.

- ``Celery(broker=url)`` with ``broker_transport_options={"global_keyprefix": "key:"}`` and
  ``task_default_queue=key``: the queue, the unacked hash and index and the bindings of a case
  all start with ``key:``, so cases never collide and clean-up deletes ``key:*``.
- One task ``bench(message)`` with ``task_acks_late=True`` (acked after the task returns, like
  eventfn), ``task_ignore_result=True`` and no result backend; its default retry policy is
  untouched (nothing fails here).
- ``app.WorkController(pool="threads", concurrency=C, without_heartbeat, without_mingle,
  without_gossip)`` started in a thread of this process (``worker.start()`` is what ``celery
  worker --pool threads -c C`` runs, minus the CLI's banner, logging and signal set-up), and
  ``worker_enable_remote_control=False``: nothing of the broadcast/control machinery is needed.
  Stopped by a warm shutdown (``celery.worker.state.should_stop``, what SIGTERM sets): the
  worker stops consuming, lets the pool finish and ack, then returns.
- ``worker_prefetch_multiplier=64``: the Optimizing guide's advice for many short tasks where
  throughput matters ("this number should be large ... Say 64, or 128"); kombu's Redis
  transport still reads one message per ``BRPOP``, so prefetch only bounds what is reserved.
- The sleep handler is ``time.sleep(0.005)`` in a pool thread. Publishing is
  ``task.apply_async`` in a loop on one producer (Celery has no bulk publish). Not timed.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from benchmarks.peers._common import Done, body, handle_noop_sync, handle_sleep_sync

TOOL = "celery"
BROKERS = ("redis",)
PREFETCH_MULTIPLIER = 64


def settings(handler: str, concurrency: int) -> str:
    return (
        f'pool="threads", concurrency={concurrency}, task_acks_late=True, '
        f"worker_prefetch_multiplier={PREFETCH_MULTIPLIER}, ignore_result, "
        "no heartbeat/mingle/gossip/remote control"
    )


def _app(url: str, key: str, done: Done | None, handler: str) -> tuple[Any, Any]:
    from celery import Celery

    app = Celery("bench", broker=url, set_as_current=False)
    app.conf.update(
        broker_transport_options={"global_keyprefix": f"{key}:"},
        broker_connection_retry_on_startup=True,
        task_default_queue=key,
        task_acks_late=True,
        task_ignore_result=True,
        result_backend=None,
        worker_prefetch_multiplier=PREFETCH_MULTIPLIER,
        worker_enable_remote_control=False,
        worker_hijack_root_logger=False,
    )
    handle = handle_noop_sync if handler == "noop" else handle_sleep_sync

    @app.task(name="bench")
    def bench(message: dict[str, Any]) -> None:
        assert done is not None
        handle(done, message["n"], message["t"])

    return app, bench


def publish(broker: str, url: str, key: str, n: int) -> None:
    app, task = _app(url, key, None, "noop")
    with app.producer_or_acquire() as producer:
        for i in range(n):
            task.apply_async((body(i),), producer=producer)
    app.close()


def consume(
    broker: str, url: str, key: str, n: int, handler: str, concurrency: int, done: Done
) -> None:
    from celery.worker import state

    logging.basicConfig(level=logging.WARNING)
    app, _ = _app(url, key, done, handler)
    worker = app.WorkController(
        pool="threads",
        concurrency=concurrency,
        hostname=f"bench@{key}",
        loglevel="WARNING",
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
    )
    thread = threading.Thread(target=worker.start, name="celery-worker", daemon=True)
    done.start()
    thread.start()
    try:
        done.wait_blocking()
    finally:
        state.should_stop = 0  # a warm shutdown, as on SIGTERM
        thread.join(120)
    if thread.is_alive():
        raise SystemExit("celery: the worker did not stop within 120 s")
    app.close()


def leftover(broker: str, url: str, key: str) -> int:
    """Delivered but not acked (the ``unacked`` hash) plus still queued (the queue lists, one
    per priority step); then delete every ``key:*`` key."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        names = list(client.scan_iter(match=f"{key}:*"))
        left = int(client.hlen(f"{key}:unacked"))
        for name in names:
            if client.type(name) == b"list":
                left += int(client.llen(name))
        if names:
            client.delete(*names)
        return left
    finally:
        client.close()
