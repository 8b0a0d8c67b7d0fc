"""The runner's no-op drain on RabbitMQ, beside bare aio-pika and aiormq consume/ack loops.

    python benchmarks/amqp_loop.py                       # N = 20,000, concurrency 64
    python benchmarks/amqp_loop.py --runs 3              # medians of 3 runs, and the ratios
    python benchmarks/amqp_loop.py -n 50000 --concurrency 128
    python benchmarks/amqp_loop.py --fetch-linger 0.002  # the broker URL's fetch_linger

Runner: publish N events to a queue (confirmed, in batches), then drain them with
``Runner(burst=True)`` and a no-op handler. Bare aio-pika: the same number of messages in a
quorum queue, drained by an aio-pika consumer (prefetch 128) that acks each message. Bare aiormq:
the same, on aiormq's channel as the broker plug-in uses it (a callback per delivery, one
``basic.ack`` with ``multiple`` per batch that arrived together): what receiving a message costs
in this client library, with nothing of eventfn's. CPU is this process's
(``time.process_time``); RabbitMQ's own CPU is not counted. Needs the RabbitMQ of
``shared/SERVICES.md`` (``AMQP_URL`` overrides the URL); everything it creates is deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import aio_pika
import aiormq.abc
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


def median_line(label: str, n: int, runs: list[Measure]) -> str:
    rate = statistics.median(n / m.wall for m in runs)
    cpu = statistics.median(m.cpu / n * 1e6 for m in runs)
    return f"{label:<14} {rate:>9,.0f} msg/s  {cpu:>7.1f} µs CPU/msg  (median of {len(runs)})"


def cpu_per_msg(measure: Measure, n: int) -> float:
    return measure.cpu / n * 1e6


async def runner_drain(n: int, concurrency: int, linger: float) -> tuple[Measure, Measure]:
    url = f"{URL}?namespace=bench{uuid.uuid4().hex[:8]}"
    if linger:
        url += f"&fetch_linger={linger}"
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


async def _fill(channel: aio_pika.abc.AbstractChannel, name: str, n: int) -> None:
    body = msgspec.json.encode({"n": 0, "pad": "x" * 200})
    for start in range(0, n, 1000):
        async with anyio.create_task_group() as group:
            for _ in range(start, min(n, start + 1000)):
                message = aio_pika.Message(body, delivery_mode=2)
                group.start_soon(channel.default_exchange.publish, message, name)


async def bare_drain(n: int) -> Measure:
    name = f"bench-bare-{uuid.uuid4().hex[:8]}"
    async with await aio_pika.connect(URL) as connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        try:
            await _fill(channel, name, n)
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


async def aiormq_drain(n: int) -> Measure:
    name = f"bench-raw-{uuid.uuid4().hex[:8]}"
    async with await aio_pika.connect(URL) as connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        try:
            await _fill(channel, name, n)
            consumer = await connection.channel()
            raw = await consumer.get_underlay_channel()
            await raw.basic_qos(prefetch_count=128)
            arrived: list[int] = []
            more = asyncio.Event()

            async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
                arrived.append(getattr(message.delivery, "delivery_tag", 0))
                more.set()

            with Measure() as drain:
                ok = await raw.basic_consume(name, on_message)
                acked = 0
                while acked < n:
                    await more.wait()
                    more.clear()
                    await raw.basic_ack(arrived[-1], multiple=True, wait=False)
                    acked += len(arrived)
                    arrived.clear()
            await raw.basic_cancel(ok.consumer_tag or "")
        finally:
            await queue.delete(if_unused=False, if_empty=False)
    return drain


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("-n", type=int, default=20_000, help="messages (default 20000)")
    parser.add_argument("--concurrency", type=int, default=64, help="runner concurrency")
    parser.add_argument("--runs", type=int, default=1, help="runs (medians when more than 1)")
    parser.add_argument(
        "--fetch-linger", type=float, default=0.0, help="the runner's broker URL fetch_linger"
    )
    args = parser.parse_args()
    where = redact_url(URL)
    linger = f", fetch_linger {args.fetch_linger:g} s" if args.fetch_linger else ""
    print(
        f"{args.n:,} messages, runner concurrency {args.concurrency}{linger}, RabbitMQ at {where}"
    )
    runner: list[Measure] = []
    bare: list[Measure] = []
    raw: list[Measure] = []
    for _ in range(args.runs):
        publish, drain = anyio.run(runner_drain, args.n, args.concurrency, args.fetch_linger)
        runner.append(drain)
        bare.append(anyio.run(bare_drain, args.n))
        raw.append(anyio.run(aiormq_drain, args.n))
        if args.runs > 1:
            print(
                f"  run {len(runner)}: runner {cpu_per_msg(drain, args.n):.1f}, bare aio-pika "
                f"{cpu_per_msg(bare[-1], args.n):.1f}, bare aiormq "
                f"{cpu_per_msg(raw[-1], args.n):.1f} µs CPU/msg",
                flush=True,
            )
    if args.runs == 1:
        print(publish.line("publish", args.n))
        print(runner[0].line("runner drain", args.n))
        print(bare[0].line("bare aio-pika", args.n))
        print(raw[0].line("bare aiormq", args.n))
        return
    print(median_line("runner drain", args.n, runner))
    print(median_line("bare aio-pika", args.n, bare))
    print(median_line("bare aiormq", args.n, raw))
    ratios = [
        cpu_per_msg(r, args.n) / cpu_per_msg(b, args.n) for r, b in zip(runner, bare, strict=True)
    ]
    floor = [
        cpu_per_msg(r, args.n) / cpu_per_msg(b, args.n) for r, b in zip(runner, raw, strict=True)
    ]
    print(
        f"runner / bare aio-pika CPU: {statistics.median(ratios):.2f}x, "
        f"runner / bare aiormq CPU: {statistics.median(floor):.2f}x (medians of per-run ratios)"
    )


if __name__ == "__main__":
    main()
