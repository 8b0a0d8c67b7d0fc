"""The runner's no-op drain on RabbitMQ, beside a bare aio-pika consume/ack loop.

    python benchmarks/amqp_loop.py                       # N = 20,000, concurrency 64
    python benchmarks/amqp_loop.py -n 50000 --concurrency 128

Runner: publish N events to a queue (confirmed, in batches), then drain them with
``Runner(burst=True)`` and a no-op handler. Bare: the same number of messages in a quorum queue,
drained by an aio-pika consumer (prefetch 128) that acks each message. CPU is this process's
(``time.process_time``); RabbitMQ's own CPU is not counted. Needs the RabbitMQ of
``shared/SERVICES.md`` (``AMQP_URL`` overrides the URL); everything it creates is deleted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

import aio_pika
import anyio
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eventfn
from eventfn.brokers import from_url, redact_url

URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


class Job(msgspec.Struct, frozen=True):
    n: int


class Measure:
    def __enter__(self) -> Measure:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu

    def line(self, label: str, n: int) -> str:
        return f"{label:<14} {n / self.wall:>9,.0f} msg/s  {self.cpu / n * 1e6:>7.1f} µs CPU/msg"


async def runner_drain(n: int, concurrency: int) -> tuple[Measure, Measure]:
    url = f"{URL}?namespace=bench{uuid.uuid4().hex[:8]}"
    seen = bytearray(n)
    app = eventfn.App("bench")

    @app.on_queue("burst")
    async def noop(job: Job) -> None:
        seen[job.n] = 1

    async with from_url(url) as broker:
        try:
            await app.connect(broker)
            with Measure() as publish:
                for start in range(0, n, 1000):
                    stop = min(n, start + 1000)
                    await app.publish_many(app.message("burst", Job(i)) for i in range(start, stop))
            runner = eventfn.Runner(app, broker, concurrency=concurrency, burst=True, poll=0.05)
            with Measure() as drain:
                summary = await runner.run()
            assert summary.handled >= n and all(seen), f"drained {sum(seen)} of {n}"
        finally:
            await app.close()
            await broker.drop()
    return publish, drain


async def bare_drain(n: int) -> Measure:
    name = f"bench-bare-{uuid.uuid4().hex[:8]}"
    async with await aio_pika.connect(URL) as connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        try:
            body = msgspec.json.encode({"n": 0, "pad": "x" * 200})
            for start in range(0, n, 1000):
                async with anyio.create_task_group() as group:
                    for _ in range(start, min(n, start + 1000)):
                        message = aio_pika.Message(body, delivery_mode=2)
                        group.start_soon(channel.default_exchange.publish, message, name)
            consumer = await connection.channel()
            await consumer.set_qos(prefetch_count=128)
            done = anyio.Event()
            count = 0

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                nonlocal count
                await message.ack()
                count += 1
                if count == n:
                    done.set()

            with Measure() as drain:
                tag = await (await consumer.get_queue(name)).consume(on_message)
                await done.wait()
            await (await consumer.get_queue(name)).cancel(tag)
        finally:
            await queue.delete(if_unused=False, if_empty=False)
    return drain


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("-n", type=int, default=20_000, help="messages (default 20000)")
    parser.add_argument("--concurrency", type=int, default=64, help="runner concurrency")
    args = parser.parse_args()
    where = redact_url(URL)
    print(f"{args.n:,} messages, runner concurrency {args.concurrency}, RabbitMQ at {where}")
    publish, drain = anyio.run(runner_drain, args.n, args.concurrency)
    bare = anyio.run(bare_drain, args.n)
    print(publish.line("publish", args.n))
    print(drain.line("runner drain", args.n))
    print(bare.line("bare aio-pika", args.n))


if __name__ == "__main__":
    main()
