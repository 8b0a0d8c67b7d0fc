"""Raw client loops: the floor of what a consumer on each broker's own client costs.

- ``raw`` on Redis: redis-py ``XREADGROUP COUNT 256`` on a fresh stream and group, then one
  ``XACK`` per message, each awaited: the loop that acks each message, as a consumer that
  settles messages one by one must.
- ``raw-batch-ack`` on Redis: the same, with one ``XACK`` of all the ids read (as
  benchmarks/redis_loop.py): the ceiling, with no per-message settling at all.
- NATS: nats-py pull consumer on a work-queue stream, ``fetch(256)``, then ``ack()`` each
  message (as benchmarks/nats_loop.py).

A batch is handled before it is acked: the no-op handler is awaited in turn; the sleep handler
is gathered in slices of ``concurrency`` (a raw loop has no worker pool of its own).
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from benchmarks.peers._common import Done, body, handle_noop, handle_sleep

BATCH = 256  # records per read
GROUP = "g"
DURABLE = "raw"


class _Raw:
    def __init__(self, tool: str, brokers: tuple[str, ...], batch_ack: bool) -> None:
        self.TOOL = tool
        self.BROKERS = brokers
        self.batch_ack = batch_ack

    def settings(self, handler: str, concurrency: int) -> str:
        how = "awaited in turn" if handler == "noop" else f"gathered {concurrency} at a time"
        ack = "one XACK per read" if self.batch_ack else "each message acked, after the batch"
        return f"{BATCH} per read, handlers {how}, {ack}"

    def publish(self, broker: str, url: str, key: str, n: int) -> None:
        run = _redis_publish(url, key, n) if broker == "redis" else _nats_publish(url, key, n)
        asyncio.run(run)

    def consume(
        self, broker: str, url: str, key: str, n: int, handler: str, concurrency: int, done: Done
    ) -> None:
        if broker == "redis":
            asyncio.run(_redis_consume(url, key, handler, concurrency, done, self.batch_ack))
        else:
            asyncio.run(_nats_consume(url, key, handler, concurrency, done))

    def leftover(self, broker: str, url: str, key: str) -> int:
        return asyncio.run(stream_leftover(broker, url, key))


TOOLS = [_Raw("raw", ("redis", "nats"), False), _Raw("raw-batch-ack", ("redis",), True)]


# --------------------------------------------------------------------------------- shared


async def handle_all(
    items: list[tuple[int, float]], handler: str, concurrency: int, done: Done
) -> None:
    """Run the handler on every (number, published_at) of one batch."""
    if handler == "noop":
        for number, published_at in items:
            await handle_noop(done, number, published_at)
        return
    for start in range(0, len(items), concurrency):
        chunk = items[start : start + concurrency]
        await asyncio.gather(*(handle_sleep(done, n, t) for n, t in chunk))


async def stream_leftover(broker: str, url: str, key: str) -> int:
    """Delivered but not acked (Redis: the group's pending list; NATS: what a work-queue stream
    still holds, since it drops acked messages), then delete the stream."""
    if broker == "redis":
        from redis.asyncio import Redis

        async with Redis.from_url(url) as client:
            try:
                pending = int((await client.xpending(key, GROUP))["pending"])
            finally:
                await client.delete(key)
        return pending
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        left = (await js.stream_info(key)).state.messages
    finally:
        await js.delete_stream(key)
        await nc.close()
    return int(left)


async def js_publish(js: Any, subject: str, n: int, headers: dict[str, str] | None) -> None:
    for start in range(0, n, 1000):
        bodies = (msgspec.json.encode(body(i)) for i in range(start, min(n, start + 1000)))
        await asyncio.gather(*(js.publish(subject, data, headers=headers) for data in bodies))


async def js_stream(url: str, key: str) -> Any:
    """A work-queue stream ``key`` on subjects ``key.>``; returns the connection."""
    import nats
    from nats.js.api import RetentionPolicy

    nc = await nats.connect(url)
    await nc.jetstream().add_stream(
        name=key, subjects=[f"{key}.>"], retention=RetentionPolicy.WORK_QUEUE
    )
    return nc


# ---------------------------------------------------------------------------------- Redis


async def _redis_publish(url: str, key: str, n: int) -> None:
    from redis.asyncio import Redis

    async with Redis.from_url(url) as client:
        await client.xgroup_create(key, GROUP, "0", mkstream=True)
        for start in range(0, n, 1000):
            pipe = client.pipeline(transaction=False)
            for number in range(start, min(n, start + 1000)):
                pipe.xadd(key, {"b": msgspec.json.encode(body(number))})
            await pipe.execute()


async def _redis_consume(
    url: str, key: str, handler: str, concurrency: int, done: Done, batch_ack: bool
) -> None:
    from redis.asyncio import Redis

    decoder = msgspec.json.Decoder(dict[str, Any])
    async with Redis.from_url(url) as client:
        await client.ping()
        done.start()
        while not done.event.is_set():
            reply = await client.xreadgroup(GROUP, "c", {key: ">"}, count=BATCH, block=1000)
            if not reply:
                raise SystemExit(f"raw redis: nothing more after {done.unique} of {done.n}")
            entries = reply[0][1]
            items = []
            for _, fields in entries:
                message = decoder.decode(fields[b"b"])
                items.append((message["n"], message["t"]))
            await handle_all(items, handler, concurrency, done)
            if batch_ack:
                await client.xack(key, GROUP, *(entry_id for entry_id, _ in entries))
            else:
                for entry_id, _ in entries:
                    await client.xack(key, GROUP, entry_id)


# ----------------------------------------------------------------------------------- NATS


async def _nats_publish(url: str, key: str, n: int) -> None:
    from nats.js.api import AckPolicy, ConsumerConfig

    nc = await js_stream(url, key)
    js = nc.jetstream()
    config = ConsumerConfig(durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT, ack_wait=30)
    await js.add_consumer(key, config)
    await js_publish(js, f"{key}.m", n, None)
    await nc.close()


async def _nats_consume(url: str, key: str, handler: str, concurrency: int, done: Done) -> None:
    import nats

    decoder = msgspec.json.Decoder(dict[str, Any])
    nc = await nats.connect(url)
    psub = await nc.jetstream().pull_subscribe_bind(DURABLE, key)
    done.start()
    while not done.event.is_set():
        messages = await psub.fetch(BATCH, timeout=5)
        items = []
        for msg in messages:
            message = decoder.decode(msg.data)
            items.append((message["n"], message["t"]))
        await handle_all(items, handler, concurrency, done)
        for msg in messages:
            await msg.ack()
    await nc.flush()
    await nc.close()
