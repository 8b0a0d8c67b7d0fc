"""FastStream, two ways: a handler per message (``faststream``) and a list handler
(``faststream-batch``), on Redis Streams and NATS JetStream.

- Redis: ``@broker.subscriber(stream=StreamSub(key, group, consumer, max_records=256,
  polling_interval=10, batch=...), max_workers=C)``; the group is created at 0 before publishing
  (FastStream would create it at ``$``).
- NATS: ``@broker.subscriber(subject, stream=JStream(key, declare=False), durable,
  pull_sub=PullSub(batch_size=256, timeout=0.05, batch=...), max_workers=C)`` on a work-queue
  stream; published with the bytes and content-type header FastStream's own publisher sends.
- ``RedisBroker``/``NatsBroker(logger=None)``, the handler takes a pydantic model, the default
  ack policy (ack after the handler returns). The batch variant has no ``max_workers``: its list
  handler awaits no-op handlers in turn and gathers sleep handlers ``C`` at a time.

This module has two tools, so it exposes ``TOOLS`` (see benchmarks/peers/run.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

from benchmarks.peers._common import Done, body, handle_noop, handle_sleep
from benchmarks.peers._raw import handle_all, js_publish, js_stream, stream_leftover

BATCH = 256  # records per read
TIMEOUT = 0.05  # PullSub timeout: what a partial (last) batch waits; eventfn polls at 0.05 s
GROUP = "g"
DURABLE = "fs"


class FastStream:
    BROKERS = ("redis", "nats")

    def __init__(self, batched: bool) -> None:
        self.batched = batched
        self.TOOL = "faststream-batch" if batched else "faststream"

    def settings(self, handler: str, concurrency: int) -> str:
        if self.batched:
            return f"batch=True (list handler, max_workers n/a), {BATCH} per read, logger=None"
        return f"max_workers={concurrency}, {BATCH} per read, logger=None"

    def publish(self, broker: str, url: str, key: str, n: int) -> None:
        if broker == "redis":
            asyncio.run(_redis_publish(url, key, n))
        else:
            asyncio.run(_nats_publish(url, key, n))

    def consume(
        self, broker: str, url: str, key: str, n: int, handler: str, concurrency: int, done: Done
    ) -> None:
        asyncio.run(_consume(broker, url, key, handler, concurrency, self.batched, done))

    def leftover(self, broker: str, url: str, key: str) -> int:
        return asyncio.run(stream_leftover(broker, url, key))


TOOLS = [FastStream(batched=False), FastStream(batched=True)]


async def _redis_publish(url: str, key: str, n: int) -> None:
    from faststream.redis import RedisBroker
    from redis.asyncio import Redis

    async with Redis.from_url(url) as client:
        await client.xgroup_create(key, GROUP, "0", mkstream=True)
    async with RedisBroker(url, logger=None) as broker:
        for start in range(0, n, 50):  # within redis-py's connection pool
            stop = min(n, start + 50)
            await asyncio.gather(*(broker.publish(body(i), stream=key) for i in range(start, stop)))


async def _nats_publish(url: str, key: str, n: int) -> None:
    nc = await js_stream(url, key)
    # the bytes and header FastStream's own publisher sends for a dict
    await js_publish(nc.jetstream(), f"{key}.m", n, {"content-type": "application/json"})
    await nc.close()


async def _consume(
    broker_name: str,
    url: str,
    key: str,
    handler: str,
    concurrency: int,
    batched: bool,
    done: Done,
) -> None:
    from pydantic import BaseModel

    class Job(BaseModel):
        n: int
        t: float

    handle = handle_noop if handler == "noop" else handle_sleep
    workers: dict[str, Any] = {} if batched else {"max_workers": concurrency}
    broker: Any
    subscriber: Any
    if broker_name == "redis":
        from faststream.redis import RedisBroker, StreamSub

        broker = RedisBroker(url, logger=None)
        sub = StreamSub(
            key, group=GROUP, consumer="c", max_records=BATCH, polling_interval=10, batch=batched
        )
        subscriber = broker.subscriber(stream=sub, **workers)
    else:
        from faststream.nats import JStream, NatsBroker, PullSub

        broker = NatsBroker(url, logger=None)
        subscriber = broker.subscriber(
            f"{key}.m",
            stream=JStream(key, subjects=[f"{key}.>"], declare=False),
            durable=DURABLE,
            pull_sub=PullSub(batch_size=BATCH, timeout=TIMEOUT, batch=batched),
            **workers,
        )

    if batched:

        @subscriber
        async def handle_batch(jobs: list[Job]) -> None:
            await handle_all([(job.n, job.t) for job in jobs], handler, concurrency, done)

    else:

        @subscriber
        async def handle_one(job: Job) -> None:
            await handle(done, job.n, job.t)

    await broker.connect()
    done.start()
    await broker.start()
    await done.wait()
    await broker.stop()
